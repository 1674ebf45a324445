r"""Launch a model folder's train.py (or OneShot's train_supernet.py) on a SLURM cluster with submitit; preempted or
timed-out jobs requeue and resume.

    python -m common.submit --model OneShot --nodes 2 --gpus-per-node 8 --partition gpu -- \
        --train-dir /data/imagenet/train --val-dir /data/imagenet/val --save /checkpoints/oneshot

Everything after `--` goes to the script; each task is one rank, and SLURM's SIGUSR2 makes it save and requeue."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from common.cli import ArgumentParser, DefaultsHelpFormatter, positive_int, prepare_output, zero_or_more
from common.errors import UserError, exit_on_user_error
from common.models import MODEL_FOLDERS, REPO_ROOT, load_module

SCRIPTS = ("train.py", "train_supernet.py")


@dataclass
class TrainJob:
    """The callable submitit runs in every task; `checkpoint` makes submitit requeue it instead of giving up."""

    model: str
    train_args: list[str]
    script: str = "train.py"

    def __call__(self) -> str:
        import submitit
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a local job's controller started ignoring it
        # One rank per task: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, as torchrun would set them.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        requeue = signal.getsignal(signal.SIGUSR2)
        status = _train_module(self.model, self.script).main(self.train_args)
        # SLURM's signals (SIGUSR2 before preemption, SIGTERM at the time limit) requeue the job; a Ctrl-C does not.
        resume = status == "stopped" and getattr(status, "signal_name", None) != "SIGINT"
        if resume and callable(requeue) and submitit.JobEnvironment().global_rank == 0:
            requeue(signal.SIGUSR2, None)
        return status

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(self.model, self.train_args, self.script))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The module docstring as written, and each flag's default."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m common.submit", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--model", required=True, choices=MODEL_FOLDERS, help="the model folder whose script runs")
    parser.add_argument("--script", choices=SCRIPTS, default=SCRIPTS[0],
                        help="the training script: train.py, or OneShot's train_supernet.py (stage 1 of the search)")
    parser.add_argument("--nodes", type=positive_int, default=1, help="machines")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per machine (one rank each)")
    parser.add_argument("--cpus-per-task", type=positive_int, default=10,
                        help="CPU cores per rank (data-loading workers)")
    parser.add_argument("--mem-gb", type=zero_or_more, default=0,
                        help="memory per node in GB (0: the partition's default)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time", type=positive_int, default=72 * 60, help="time limit of one job in minutes")
    parser.add_argument("--max-requeues", type=zero_or_more, default=20,
                        help="requeues after time-outs before giving up")
    parser.add_argument("--job-name", default=None, help="SLURM job name (default: the model name)")
    parser.add_argument("--log-dir", default="slurm_logs", help="folder for submitit's logs and job files")
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                        help="submitit executor (default: SLURM, refused where there is none); local: the ranks as "
                             "background processes on this machine; debug: one rank in this process")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of --script")
    return parser


def _train_module(model: str, script: str) -> ModuleType:
    folder = REPO_ROOT / model
    if not (folder / script).is_file():
        raise UserError(f"--script {script}: {model} has none; give --model "
                        + " or ".join(name for name in MODEL_FOLDERS if (REPO_ROOT / name / script).is_file()))
    sys.path.insert(0, str(folder))  # for the script's `import network`
    return load_module(folder / script, f"{Path(script).stem}_{model.replace('.', '_')}")


def _check_train_args(model: str, script: str, train_args: list[str], ranks: int) -> None:
    """Parse the script's arguments here, so that a mistyped flag, a number out of range or a batch the `ranks`
    cannot share is refused now rather than after the job waited in the queue; the job checks the paths when it
    starts, on the cluster's file system."""
    from common.training import build_parser, defaults_source
    recipe = _train_module(model, script).RECIPE
    parser = build_parser(recipe)
    parser.prog = f"{script} (the arguments after --)"  # for its --help
    try:
        parsed = parser.parse_args(train_args)
    except UserError as error:
        raise UserError(f"{script}'s arguments after --: {error}") from None
    batch_size = parsed.batch_size or defaults_source(parsed, recipe).batch_size
    if batch_size % ranks:
        raise UserError(f"{script}'s batch of {batch_size} (--batch-size) must divide by the job's {ranks} ranks "
                        "(--nodes x --gpus-per-node)")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Submit; with --cluster local or debug, also wait for the job and return its exit status."""
    args = build_parser().parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not train_args:
        raise UserError(f"give {args.script}'s arguments after --, e.g. -- --train-dir DIR --val-dir DIR")
    _check_train_args(args.model, args.script, train_args,
                      1 if args.cluster == "debug" else args.nodes * args.gpus_per_node)
    import submitit
    if args.cluster is None and submitit.AutoExecutor.which() != "slurm":
        # submitit would start every rank as a process on this machine, in the background.
        raise UserError(f"no SLURM on this machine (no sbatch found); --cluster local runs the job's "
                        f"{args.nodes * args.gpus_per_node} ranks as processes here, or use torchrun")
    prepare_output("--log-dir", args.log_dir, folder=True)
    executor = submitit.AutoExecutor(folder=Path(args.log_dir) / "%j", cluster=args.cluster,
                                     slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(
        name=args.job_name or args.model, nodes=args.nodes, tasks_per_node=args.gpus_per_node,
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, timeout_min=args.time,
        **({"mem_gb": args.mem_gb} if args.mem_gb else {}),
        **({"slurm_partition": args.partition} if args.partition else {}),
        **({"slurm_signal_delay_s": 120} if executor.cluster == "slurm" else {}))
    # submitit's local controller, the process that waits on the ranks, shares the terminal: a Ctrl-C would print
    # its traceback. It starts ignoring Ctrl-C (it ends when the ranks do); each rank takes it back in TrainJob.
    ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN) if executor.cluster == "local" else None
    try:
        try:
            job = executor.submit(TrainJob(args.model, train_args, args.script))
        finally:
            if ctrl_c is not None:
                signal.signal(signal.SIGINT, ctrl_c)
        print(f"submitted job {job.job_id} ({executor.cluster}); logs in {Path(args.log_dir) / str(job.job_id)}",
              flush=True)
        if executor.cluster == "slurm":
            return 0
        return _wait_for_ranks(job, 1 if executor.cluster == "debug" else args.nodes * args.gpus_per_node,
                               args.script)
    finally:
        # submitit makes the folder as named, where only SLURM fills in %j: an empty "%j" is left elsewhere.
        with contextlib.suppress(OSError):
            (Path(args.log_dir) / "%j").rmdir()


def _wait_for_ranks(job, ranks: int, script: str) -> int:
    """Wait for a job whose ranks are processes of this machine and say how it ended, as torchrun would: UserError
    (status 1) naming the first failed rank's last error line; else 0 when the script finished on every rank."""
    from submitit.local.debug import DebugJob

    job.wait()
    statuses = []
    for rank in range(ranks):
        task = job.task(rank)
        # A rank that exited (train.py's one-line errors do) leaves no result file, and asking submitit for the
        # result of such a task waits 15 s for it; the debug executor keeps its one result in memory.
        kept = task.paths.result_pickle.exists() or isinstance(task, DebugJob)
        try:
            statuses.append(task.result() if kept else None)
        except Exception:  # the rank raised: its log holds the traceback
            statuses.append(None)
        if statuses[-1] is None:
            try:
                lines = Path(task.paths.stderr).read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            said = next((line for line in reversed(lines) if line.strip()), "it wrote no error")
            raise JobFailed(f"job {job.job_id}: rank {rank} failed: {said} (its log: {task.paths.stderr})")
    print(f"job {job.job_id}: {script} {statuses[0]}" + ("" if len(set(statuses)) == 1 else f" on rank 0, "
                                                         f"{', '.join(map(str, statuses[1:]))} on the others"))
    return 0 if set(statuses) == {"finished"} else 1


class JobFailed(UserError):
    """A job that ended with an error on one of its ranks."""

    exit_status = 1


if __name__ == "__main__":
    sys.exit(main())
