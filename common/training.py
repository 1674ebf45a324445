"""The training loop of every model folder's train.py (MODELS.md, "Training recipes"): iteration-based SGD, the
learning rate a function of the iteration, validation and crash-safe checkpoints at fixed intervals, automatic resume.
Read from `run_training` down: set-up (`build_trainer`), the loop (`Trainer.train`), after the schedule (`finish`)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from common.checkpoint import get_training_state, load_checkpoint, rng_state
from common.atomic_io import claim_output
from common.checkpoint_store import get_latest_model, list_checkpoints, save_checkpoint
from common.cli import (ArgumentParser, add_device_argument, checked, multiple_of_32, positive_int, prepare_output,
                        seed_value, worker_count, zero_or_more)
from common.data import build_eval_loader, build_train_loader, scan_image_folder
from common.demo_data import demo_dataset
from common.distributed import (DistInfo, RankVote, all_gather_objects, all_reduce_sum, any_rank, average_buffers,
                                barrier, checked_on_main, init_distributed, shutdown_distributed)
from common.errors import UserError, exit_on_user_error, listed
from common.evaluate import evaluate, warn_if_not_finite
from common.hardware import (AMP_CHOICES, SpeedChoice, autocast, probe_batch_size, resolve_speed,
                             training_step_timer)
from common.input_format import InputFormat, Preprocess
from common.model_state import (WeightsMismatchError, check_model_folder, load_model_state,
                                read_checkpoint_metadata)
from common.models import REPO_ROOT, create_network_for, load_module
from common.recipe import DemoRecipe, FinetuneRecipe, NetworkHooks, Recipe  # noqa: F401  (the scripts' imports)
from common.run_log import RunLog, plot_curves

DEMO_DATA = REPO_ROOT / "data" / "demo"


class TrainingFailed(UserError):
    """The loss became NaN or infinite, or not one image of a batch could be decoded: found during the work, so
    status 1, as a disk that fills (2 is for a command refused before the work)."""

    exit_status = 1


# -- command line ---------------------------------------------------------------------------------------------

# The ranges of train.py's own numbers; the shared ones (counts, --image-size, --seed) come from common.cli.
off_or_count = checked(int, lambda value: value >= 0, "must be 0 (off) or more")
class_count = checked(int, lambda value: value >= 2, "must be 2 or more (leave it out for the class folders' count)")
positive_float = checked(float, lambda value: 0 < value < math.inf, "must be a positive number")
zero_or_more_float = checked(float, lambda value: 0 <= value < math.inf, "must be 0 or more")
below_one = checked(float, lambda value: 0 <= value < 1, "must be at least 0 and below 1")


def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    """The train.py command line; recipe-dependent defaults are None here and filled in by `resolve_args`."""
    parser = ArgumentParser(
        description=f"Train {recipe.model_name} (ImageFolder data, the original recipe; resumes automatically).")
    _add_data_flags(parser.add_argument_group("data"), recipe)
    _add_optimisation_flags(parser.add_argument_group("optimisation (defaults: the original recipe)"), recipe)
    if recipe.hooks.one_network:
        _add_finetuning_flags(parser.add_argument_group(
            "fine-tuning", f"--pretrained switches the defaults to the fine-tuning recipe: batch "
                           f"{recipe.finetune.batch_size}, lr {recipe.finetune.learning_rate}, "
                           f"{recipe.finetune.total_iters} iterations, {recipe.finetune.warmup_iters} of warm-up, "
                           f"validation every {recipe.finetune.val_interval} iterations, a checkpoint every "
                           f"{recipe.finetune.save_interval}"))
    else:
        parser.set_defaults(pretrained=None, freeze_backbone=False, eval=False, eval_resume=None)
    _add_running_flags(parser.add_argument_group("running"), recipe)
    end = parser.add_argument_group("after the main schedule")
    end.add_argument("--bn-recalibrate", type=off_or_count, default=0, metavar="N",
                     help="re-estimate BatchNorm statistics over N training batches, validate, and save the final "
                          "checkpoint again with them (OneShot's original: 1250)")
    end.add_argument("--average-best", type=off_or_count, default=0, metavar="K",
                     help="write and validate the average of the best K checkpoints by validation top-1 error, "
                          "chosen among those still on disk (raise --keep to keep more)")
    end.add_argument("--recompute-bn", type=off_or_count, default=0, metavar="N",
                     help="re-estimate BatchNorm statistics of the averaged weights over N training batches")
    recipe.hooks.add_arguments(parser)
    return parser


def _add_data_flags(data: argparse._ArgumentGroup, d: Recipe) -> None:
    data.add_argument("--train-dir", help="training images in ImageFolder layout (one sub-folder per class)")
    data.add_argument("--val-dir", help="validation images, same class sub-folders as --train-dir")
    data.add_argument("--demo", action="store_true",
                      help="train on the built-in demo dataset (generated on first use in the repository's "
                           f"data/demo) with the demo recipe: batch {d.demo.batch_size}, {d.demo.total_iters} "
                           f"iterations, {d.demo.image_size}px images"
                           f"{' (with --pretrained too)' * d.hooks.one_network}; explicit flags still win")
    data.add_argument("--num-classes", type=class_count, help="number of classes (default: the class folders found)")
    data.add_argument("--image-size", type=multiple_of_32, help=f"training crop size (default: {d.image_size})")
    data.add_argument("--workers", type=worker_count, default=min(8, os.cpu_count() or 1),
                      help="data-loading worker processes per rank (default: the CPU count, at most 8)")


def _add_finetuning_flags(tune: argparse._ArgumentGroup) -> None:
    tune.add_argument("--pretrained", metavar="FILE",
                      help="start a new run from these weights (any file eval.py accepts); with another number of "
                           "classes the classifier and side heads start afresh. An interrupted run resumes from its "
                           "own checkpoints in --save, never from FILE again, with the fine-tuning defaults whether "
                           "or not --pretrained is given again")
    tune.add_argument("--freeze-backbone", action="store_true",
                      help="train the classifier only (a linear probe): every other weight and all BatchNorm "
                           "statistics stay as loaded")


def _add_optimisation_flags(optim: argparse._ArgumentGroup, d: Recipe) -> None:
    optim.add_argument("--batch-size", type=positive_int, help=f"global batch over all ranks (default: {d.batch_size})")
    optim.add_argument("--total-iters", type=positive_int, help=f"iterations to train (default: {d.total_iters})")
    optim.add_argument("--learning-rate", type=positive_float,
                       help=f"base learning rate (default: {d.learning_rate} at batch {d.batch_size}, scaled "
                            "linearly with --batch-size); a resumed run trains at the rate of this command line")
    tuned = (f"; with --pretrained {d.finetune.warmup_iters}, or the same share of a --total-iters shorter than "
             f"{d.finetune.total_iters}") if d.hooks.one_network else ""
    optim.add_argument("--warmup-iters", type=zero_or_more,
                       help=f"iterations of linear learning-rate warm-up from 0 before the linear decay (default: 0"
                            f"{tuned})")
    optim.add_argument("--momentum", type=zero_or_more_float, default=d.momentum, help="SGD momentum")
    optim.add_argument("--weight-decay", type=zero_or_more_float, default=d.weight_decay,
                       help="weight decay, applied to weights of 2 or more dimensions only")
    optim.add_argument("--label-smooth", type=below_one, default=d.label_smooth, help="label smoothing epsilon")
    optim.add_argument("--seed", type=seed_value, default=0, help="seed of initialisation, data order and augmentation")
    optim.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (slower): a resumed run is bit-identical")
    optim.add_argument("--ema", action="store_true",
                       help="also keep an exponential moving average of the weights: validated as val_ema and "
                            "saved in each checkpoint"
                            + ("; with --eval, evaluate the checkpoint's EMA weights" if d.hooks.one_network else ""))
    optim.add_argument("--ema-decay", type=below_one, default=0.9998,
                       help="EMA decay, reached after a warm-up in which the early weights fade out fast")


def _add_running_flags(run: argparse._ArgumentGroup, d: Recipe) -> None:
    add_device_argument(run)
    run.add_argument("--amp", choices=AMP_CHOICES,
                     help="mixed precision (default: auto): auto picks bf16 on CUDA (fp16 where bf16 is not "
                          "supported; fp16 uses a gradient scaler), on a CPU bf16 only where it is native and "
                          "measured faster, else float32 (none); a resumed run keeps the choice it started with"
                          + (". --eval evaluates as eval.py does: float32 unless --amp is given"
                             if d.hooks.one_network else ""))
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default="auto",
                     help="channels_last memory format; --no-channels-last for NCHW; auto: channels_last on CUDA, "
                          "on a CPU the layout measured faster for this model in a few steps at start (NCHW with "
                          "--deterministic); a resumed run keeps the layout it started with")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the network (the first iterations wait for compilation)")
    run.add_argument("--save", default="./models", help="checkpoint folder (also metrics.jsonl, TensorBoard)")
    run.add_argument("--keep", type=positive_int, default=5,
                     help="newest checkpoints to keep (the best one is kept too)")
    run.add_argument("--auto-continue", action=argparse.BooleanOptionalAction, default=True,
                     help="resume from the newest good checkpoint in --save; --no-auto-continue never resumes "
                          "and refuses a --save that holds checkpoints")
    run.add_argument("--display-interval", type=positive_int,
                     help=f"iterations between progress lines, the first iteration shown too (default: "
                          f"{d.display_interval})")

    def tuned(interval: int) -> str:
        return f"; {interval} with --pretrained" if d.hooks.one_network else ""

    run.add_argument("--val-interval", type=positive_int,
                     help=f"iterations between validations (default: {d.val_interval}"
                          f"{tuned(d.finetune.val_interval)})")
    run.add_argument("--save-interval", type=positive_int,
                     help=f"iterations between checkpoints (default: {d.save_interval}"
                          f"{tuned(d.finetune.save_interval)})")
    run.add_argument("--val-batch-size", type=positive_int, default=100, help="validation batch size per rank")
    if d.hooks.one_network:
        run.add_argument("--eval", action="store_true",
                         help="only evaluate the newest checkpoint in --save (or --eval-resume FILE) on --val-dir "
                              "with this folder's eval.py (its classes and image size: the checkpoint's), and exit")
        run.add_argument("--eval-resume", metavar="FILE",
                         help="weights file to evaluate with --eval (any layout eval.py takes)")


def defaults_source(args: argparse.Namespace, recipe: Recipe) -> Recipe | DemoRecipe | FinetuneRecipe:
    """Where the defaults of a command come from: the demo recipe with --demo, the fine-tuning one with
    --pretrained or when it resumes a fine-tune in --save (whose file it never reads again, so the command may leave
    it out; the original recipe's defaults were 300,000 iterations at batch 1024 then), else the original recipe."""
    if args.demo:
        return recipe.demo
    resumed = _recorded_args(args.save) if args.auto_continue and not args.pretrained else {}
    return recipe.finetune if args.pretrained or resumed.get("pretrained") else recipe


def resolve_args(args: argparse.Namespace, recipe: Recipe) -> argparse.Namespace:
    """Fill recipe defaults (demo ones with --demo) and check the values before any work starts (and before --save
    is made, so that a mistyped command leaves no folder behind)."""
    source = defaults_source(args, recipe)
    warmup_given = args.warmup_iters is not None
    for name in ("batch_size", "total_iters", "image_size", "display_interval", "val_interval", "save_interval",
                 "warmup_iters"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(source, name, getattr(recipe, name, 0)))
    if args.learning_rate is None:
        args.learning_rate = source.learning_rate * args.batch_size / source.batch_size
    if not warmup_given:
        # A shorter run than the recipe's warms up for the same share of it, so its rate still reaches the full one.
        args.warmup_iters = min(args.warmup_iters, math.ceil(args.total_iters * args.warmup_iters / source.total_iters))
    elif args.warmup_iters >= args.total_iters:
        raise UserError(f"--warmup-iters {args.warmup_iters} is not shorter than --total-iters {args.total_iters}: "
                        "the learning rate would never reach --learning-rate; give fewer warm-up iterations")
    if args.demo:
        train_dir, val_dir = demo_dataset(DEMO_DATA)
        args.train_dir = args.train_dir or str(train_dir)
        args.val_dir = args.val_dir or str(val_dir)
    if not args.train_dir:
        raise UserError("--train-dir is required (or --demo for the built-in dataset)")
    if args.average_best and not args.val_dir:
        raise UserError(f"--average-best {args.average_best} picks checkpoints by their validation error: give "
                        "--val-dir DIR")
    if args.recompute_bn and not args.average_best:
        raise UserError(f"--recompute-bn {args.recompute_bn} re-estimates the statistics of the --average-best K "
                        "average: give --average-best K too (for the trained network itself, --bn-recalibrate N)")
    if args.freeze_backbone and not args.pretrained:
        raise UserError("--freeze-backbone trains only the classifier of loaded weights: give --pretrained FILE")
    return args


def scan_classes(args: argparse.Namespace, say: Callable[..., None]) -> tuple[list[tuple[str, int]], list[str]]:
    """(samples, classes) of the training folder. A val folder that is not one of its classes is an error at start,
    not after --val-interval iterations; training classes without a val folder are only noted."""
    samples, classes = scan_image_folder(args.train_dir, "--train-dir")
    if len(classes) < 2:
        raise UserError(f"--train-dir {args.train_dir}: only one class folder ({classes[0]}); a classifier needs "
                        f"two or more, one sub-folder per class")
    if args.num_classes and args.num_classes < len(classes):
        raise UserError(f"--num-classes {args.num_classes} is smaller than the {len(classes)} class folders "
                        f"of --train-dir")
    if not args.val_dir:
        return samples, classes
    val_classes = scan_image_folder(args.val_dir, "--val-dir")[1]
    stray = [name for name in val_classes if name not in classes]
    if stray:
        raise UserError(f"--val-dir {args.val_dir}: {len(stray)} class folder(s) not in --train-dir: "
                        f"{listed(stray, 5)}; validation needs the training classes' folder names")
    missing = [name for name in classes if name not in val_classes]
    if missing:
        say(f"note: --val-dir has no folder for {len(missing)} of the {len(classes)} training classes "
            f"({listed(missing, 5)}); validation scores the others")
    return samples, classes


# -- pieces of the loop ---------------------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on parameters named `weight` with 2 or more dimensions (no BN, no biases)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if parameter.ndim >= 2 and "weight" in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(args: argparse.Namespace, iteration: int) -> float:
    """The rate of iteration k (0-based): lr * min(1, (k + 1) / warmup) * (1 - k / total), from the command line
    alone, so a resumed run needs no scheduler state and a lower --learning-rate can continue a diverged run."""
    decay = max(0.0, 1.0 - iteration / args.total_iters)
    warmup = min(1.0, (iteration + 1) / args.warmup_iters) if args.warmup_iters else 1.0
    return args.learning_rate * warmup * decay


class SignalStop(BaseException):
    """A signal that ends the run at once (a second Ctrl-C, or any stop signal after the schedule): a BaseException,
    as KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"{self.signal_name}: stopped at once")


class Stopped(str):
    """The status "stopped" of a run a signal ended early (after saving), with the signal's name."""

    def __new__(cls, signal_name: str) -> Stopped:
        status = super().__new__(cls, "stopped")
        status.signal_name = signal_name
        return status


def exit_status(status: str) -> int:
    """The process exit status of a run's result: 0 when finished, 128 + the signal's number when a signal stopped
    it (130 for Ctrl-C, 143 for SIGTERM), so `train.py && eval.py` stops too."""
    if isinstance(status, Stopped):
        return 128 + signal.Signals[status.signal_name].value
    return 0 if status == "finished" else 1


_STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR2", None)) if s is not None)


class StopAtOnce:
    """SIGINT and SIGTERM end the run at once (SignalStop), for the work outside the schedule, where no checkpoint
    is pending. SIGUSR2 keeps whatever handler was there before (submitit's requeue). On leaving, the handlers
    installed before come back."""

    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        raise SignalStop(signum)


class StopRequest(StopAtOnce):
    """While the schedule runs, SIGINT, SIGTERM and SIGUSR2 (SLURM's warning before preemption) ask the loop to save
    a checkpoint and leave after the running step (the step after it when distributed, as the ranks agree on it); a
    second Ctrl-C stops at once."""

    signals = _STOP_SIGNALS
    signal_name: str | None = None
    # torchrun forwards the terminal's Ctrl-C to ranks that got it already, within milliseconds: a Ctrl-C that
    # soon after the first is the same request, not the user's second.
    SAME_REQUEST_SECONDS = 1.0

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce  # a terminal's Ctrl-C reaches every rank: one of them says what happens
        self._first = 0.0

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            if signum == signal.SIGINT and time.monotonic() - self._first > self.SAME_REQUEST_SECONDS:
                raise SignalStop(signum)
            return
        self.signal_name, self._first = signal.Signals(signum).name, time.monotonic()
        if self.announce:
            print(f"\n{self.signal_name}: saving a checkpoint, then stopping (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def resolve_training_speed(args: argparse.Namespace, model: nn.Module, info: DistInfo) -> SpeedChoice:
    """Set `args.channels_last` (bool) and `args.amp` (None, "bf16" or "fp16") from their flags: explicit flags
    win; "auto" takes what the run's newest checkpoint recorded, else resolves by the device (rank 0 times the CPU
    candidates for all; nothing is timed with --deterministic)."""
    recorded = _recorded_args(args.save) if args.auto_continue else {}
    kept = []
    args.amp = args.amp or "auto"  # not given: auto (None stands for "not given" so that --eval can tell)
    if args.channels_last == "auto":
        args.channels_last = None
    if args.channels_last is None and isinstance(recorded.get("channels_last"), bool):
        args.channels_last = recorded["channels_last"]
        kept.append("layout")
    if args.amp == "auto" and "amp" in recorded:
        args.amp = recorded["amp"]
        kept.append("precision")
    batch, prepare = args.batch_size // info.world_size, None
    if info.is_main and not args.deterministic and info.device.type == "cpu":  # CUDA's choice is fixed
        batch = probe_batch_size(model, batch, args.image_size)
        prepare = training_step_timer(model, batch, args.image_size, info.device)
    speed = resolve_speed(args.channels_last, args.amp, info.device, prepare,
                          what=f"on training steps of {batch} images of {args.image_size}px")
    if kept:
        reason = f"{' and '.join(kept)} as recorded in the checkpoint of this run"
        speed = SpeedChoice(speed.channels_last, speed.amp, reason if len(kept) == 2 else f"{reason}; {speed.reason}")
    speed = all_gather_objects(speed, info)[0]
    args.channels_last, args.amp = speed.channels_last, speed.amp
    return speed


def _recorded_args(save_dir: str) -> dict:
    """The command line recorded in the newest readable checkpoint of `save_dir` ({} if none): every checkpoint
    of a folder comes from the same run, so the settings of an unverified one are the run's."""
    for info in reversed(list_checkpoints(save_dir)):
        try:
            return read_checkpoint_metadata(info.path).get("args") or {}
        except UserError:
            continue
    return {}


def plain_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


class Meter:
    """The running tallies of one logging window (loss, correct, images, skipped) and the clocks of the window and the
    run, with validating and saving paused out so images/s and the ETA count training alone. The tallies stay on the
    device until `read`: a GPU never waits per step."""

    def __init__(self, device: torch.device, start_iteration: int) -> None:
        self.start_iteration = start_iteration
        # Batches in which no image could be decoded: their loss (a mean over no images) is NaN.
        self.empty_batches = 0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.loss, self.correct = torch.zeros((), device=device), torch.zeros((), device=device)
        self.run_start = time.perf_counter()
        self._new_window()

    def _new_window(self) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.iterations = self.images = self.skipped = 0
        self.window_start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, skipped: int) -> None:
        self.nonfinite |= ~torch.isfinite(loss)
        self.loss += loss
        self.correct += (logits.argmax(1) == labels).sum()
        self.iterations += 1
        self.images += labels.numel()
        self.empty_batches += labels.numel() == 0
        self.skipped += skipped

    @contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            paused = time.perf_counter() - started
            self.window_start += paused
            self.run_start += paused

    def read(self, done: int, info: DistInfo) -> tuple[dict, float]:
        """The window's figures as means over all ranks (the global batch, whatever the number of processes) and
        the seconds per iteration so far; a new window starts."""
        elapsed = time.perf_counter() - self.window_start
        tally = all_reduce_sum(torch.stack([self.loss, self.correct, self.loss.new_tensor(float(self.images))]), info)
        images = int(tally[2].item())
        window = {"loss": tally[0].item() / self.iterations / info.world_size,
                  "top1_error": 100.0 * (1.0 - tally[1].item() / max(1, images)),
                  "images_per_second": images / max(elapsed, 1e-9), "skipped": self.skipped}
        per_iteration = (time.perf_counter() - self.run_start) / (done - self.start_iteration)
        self._new_window()
        return window, per_iteration


@dataclass(kw_only=True)
class Trainer:
    """Everything the loop works on. `model` is the network itself; the loop trains `train_model` (DDP and
    torch.compile wrappers, made here) and saves, validates and averages `model`."""

    args: argparse.Namespace
    recipe: Recipe
    info: DistInfo
    model: nn.Module
    preprocess: Preprocess
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    metadata: dict
    log: RunLog
    val_loader: torch.utils.data.DataLoader | None
    start_iteration: int = 0
    best_error: float | None = None
    train_model: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.train_model = self.model
        if self.info.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.info.device.index] if self.info.device.type == "cuda" else None,
                find_unused_parameters=self.recipe.hooks.find_unused_parameters)
        if self.args.compile:
            self.train_model = torch.compile(self.train_model)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.args.label_smooth)

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout the network's weights and inputs are in."""
        return torch.channels_last if self.args.channels_last else torch.contiguous_format

    def autocast(self) -> torch.autocast:
        return autocast(self.info.device, self.args.amp)

    def train(self, stop: StopRequest) -> bool:
        """Train from `start_iteration` to the end (True), or until `stop` holds a signal (False, after saving)."""
        args, info = self.args, self.info
        batches = iter(self.train_loader(seed=args.seed, start_iteration=self.start_iteration))
        meter = Meter(info.device, self.start_iteration)
        last_saved = self.start_iteration
        # Every step asks whether a signal reached any rank, without waiting for the answer: a stop lands one step
        # later on every rank, well within the grace torchrun and SLURM give before they kill.
        stop_vote = RankVote(info)
        self.train_model.train()
        for iteration in range(self.start_iteration, args.total_iters):
            images, labels, skipped = next(batches)
            labels = labels.to(info.device, non_blocking=True)
            loss, logits = self.step(images.to(info.device, non_blocking=True), labels, iteration)
            meter.add(loss, logits, labels, skipped)
            done = iteration + 1
            display, validate, save = (done % interval == 0 or done == args.total_iters for interval in
                                       (args.display_interval, args.val_interval, args.save_interval))
            # The first iteration of a start is shown too, so a slow machine answers at once, not an interval later.
            display = display or done == self.start_iteration + 1
            stopping = stop_vote.vote(stop.signal_name is not None)
            if stopping or done == args.total_iters:
                stopping = stop_vote.result() or stopping  # leaving: the vote just started counts too
            if not (display or validate or save or stopping):
                continue
            self.check_finite(meter, done, last_saved)
            if display:
                self.display(meter, done)
            with meter.paused():
                metrics = self.validate_all(done) if validate else None
                if save or stopping:
                    self.save(done, metrics)
                    last_saved = done
            if stopping:
                self.say(f"stopped at iteration {done} ({stop.signal_name}); run the same command to resume")
                return False
        return True

    def check_finite(self, meter: Meter, done: int, last_saved: int) -> None:
        """Stop with a one-line error once the loss or the weights are NaN or infinite on any rank."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if not any_rank(bool(meter.nonfinite) or not finite, self.info):
            return
        kept = (f"nothing after the checkpoint at iteration {last_saved} was saved, so it stays the latest"
                if last_saved else "no checkpoint was saved")
        if any_rank(meter.empty_batches > 0, self.info):
            raise TrainingFailed(f"not one image of a training batch after iteration {last_saved} could be decoded "
                                 f"(see the skipped files above), so its loss is undefined; {kept}. Replace or remove "
                                 "the unreadable files in --train-dir")
        raise TrainingFailed(
            f"the loss or the weights became NaN or infinite after iteration {last_saved} (noticed at {done}); "
            f"{kept}. Lower --learning-rate{', or use --amp bf16 instead of fp16' if self.args.amp == 'fp16' else ''}")

    def step(self, images: torch.Tensor, labels: torch.Tensor, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on one batch at the iteration's learning rate; the loss and logits, detached."""
        self.recipe.hooks.prepare(self.model, iteration, self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.args, iteration)
        with self.autocast():
            inputs = self.preprocess(images, self.memory_format)
            loss, logits = compute_loss(self.train_model(inputs), labels, self.criterion, self.recipe.loss_weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step=iteration + 1)
        return loss.detach(), logits.detach()

    def display(self, meter: Meter, done: int) -> None:
        window, per_iteration = meter.read(done, self.info)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.log("train", done, {**window, "lr": lr})
        note = f" | skipped {window['skipped']} unreadable image(s)" if window["skipped"] else ""
        self.say(f"[{self.recipe.model_name}] iter {done}/{self.args.total_iters} | lr {lr:.5f} | loss "
                 f"{window['loss']:.4f} | top-1 err {window['top1_error']:5.1f}% | "
                 f"{window['images_per_second']:7.1f} img/s | "
                 f"ETA {format_duration(per_iteration * (self.args.total_iters - done))}{note}")

    def say(self, text: str) -> None:
        if self.info.is_main:
            print(text, flush=True)

    def validate_all(self, iteration: int) -> dict | None:
        """Validate the network (and its EMA), note the best error so far; back to training mode."""
        metrics = self.validate(iteration)
        if self.ema is not None:
            self.validate(iteration, self.ema.module, split="val_ema")
        self.train_model.train()
        if metrics and (self.best_error is None or metrics["top1_error"] < self.best_error):
            self.best_error = metrics["top1_error"]
        return metrics

    def validate(self, iteration: int, model: nn.Module | None = None, split: str = "val") -> dict | None:
        if self.val_loader is None:
            return None
        model = self.model if model is None else model
        self.recipe.hooks.prepare(model, None, self.args)
        results = evaluate(model, self.preprocess, self.val_loader, device=self.info.device, amp=self.args.amp,
                           progress=False)
        if not results["images"]:
            if self.info.is_main:
                print(f"warning: {split} @ {iteration}: none of the {results['skipped']} --val-dir image(s) could be "
                      "decoded, so nothing was validated and no metrics are recorded", file=sys.stderr, flush=True)
            return None
        metrics = {key: results[key] for key in ("top1_error", "top5_error", "loss")}
        self.log.log(split, iteration, {**metrics, "images": results["images"], "skipped": results["skipped"]})
        skipped = f", {results['skipped']} skipped: undecodable" if results["skipped"] else ""
        self.say(f"{split} @ {iteration}: top-1 error {metrics['top1_error']:.2f}%  top-5 error "
                 f"{metrics['top5_error']:.2f}%  loss {metrics['loss']:.4f}  ({results['images']} images{skipped})")
        if self.info.is_main:
            warn_if_not_finite(metrics["loss"], split, self.args.amp)
        return metrics

    def save(self, iteration: int, metrics: dict | None) -> None:
        # Every rank's RNG is stored, so a resumed multi-process run continues each rank's own random stream.
        rng = all_gather_objects(rng_state(), self.info)
        if not self.info.is_main:
            return
        state = get_training_state(self.model, self.optimizer, scaler=self.scaler, ema=self.ema, iteration=iteration,
                                   best_metric=self.best_error, metrics=metrics, metadata=self.metadata, rng=rng)
        started = time.perf_counter()
        path = save_checkpoint(state, iteration, self.args.save, keep=self.args.keep, best_metric_name="top1_error")
        print(f"saved {path} ({time.perf_counter() - started:.1f} s)", flush=True)

    def train_loader(self, seed: int, start_iteration: int = 0) -> torch.utils.data.DataLoader:
        """Training batches of --train-dir (the original augmentation) for this rank, from `start_iteration`."""
        args, info = self.args, self.info
        return build_train_loader(
            args.train_dir, crop_size=args.image_size, global_batch_size=args.batch_size, seed=seed,
            start_iteration=start_iteration, rank=info.rank, world_size=info.world_size, workers=args.workers,
            pin_memory=info.device.type == "cuda",
            samples_filter=lambda samples: self.recipe.hooks.train_samples(samples, args))[0]


def compute_loss(outputs, labels: torch.Tensor, criterion: nn.Module, weights: tuple[float, ...]):
    """Weighted sum of the label-smoothed losses of every output; returns (loss, main logits)."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(outputs) != len(weights):
        raise RuntimeError(f"the network returned {len(outputs)} outputs but the recipe weighs {len(weights)}")
    loss = sum(weight * criterion(output.float(), labels) for weight, output in zip(weights, outputs))
    return loss, outputs[0]


# -- the run --------------------------------------------------------------------------------------------------

# Resume: restore a checkpoint of this project into a model and its optimizer, scaler and EMA.
load_training_checkpoint = load_checkpoint


def run_training(network: ModuleType, recipe: Recipe, load_checkpoint: Callable[..., dict],
                 argv: list[str] | None = None) -> str:
    """Parse the command line and train (or only evaluate with --eval); bad input ends with a one-line error. Returns
    "finished", or `Stopped` when a signal ended the run after saving; a signal that stops it at once exits here."""
    try:
        return exit_on_user_error(_run)(network, recipe, load_checkpoint, argv)
    except SignalStop as stop:
        print(f"\n{stop.signal_name}: stopped at once; the checkpoints saved before are intact", file=sys.stderr,
              flush=True)
        sys.exit(128 + signal.Signals[stop.signal_name].value)


def _run(network: ModuleType, recipe: Recipe, load_checkpoint: Callable[..., dict], argv: list[str] | None) -> str:
    args = build_parser(recipe).parse_args(argv)
    if args.eval:
        return _evaluate_only(network, args)
    args = resolve_args(args, recipe)
    info = init_distributed(args.device)
    try:
        # Outside the schedule (set-up, BN re-estimation, averaging) no checkpoint is pending: a signal stops at once.
        with StopAtOnce():
            trainer = build_trainer(network, recipe, load_checkpoint, args, info)
            if trainer.start_iteration < args.total_iters:
                with StopRequest(announce=info.is_main) as stop:
                    completed = trainer.train(stop)
                    # A signal may come after the last check: every rank learns of it and stops with the others.
                    signals = [name for name in all_gather_objects(stop.signal_name, info) if name]
                if signals:
                    if completed:
                        trainer.say(f"{signals[0]} after the last iteration: stopped before the steps after the "
                                    "schedule; run the same command to do them")
                    trainer.log.close()
                    return Stopped(signals[0])
            else:
                trainer.say(f"no training to do: the run in --save {args.save} is at iteration "
                            f"{trainer.start_iteration} of --total-iters {args.total_iters} (raise it to train longer)")
            finish(trainer)
            return "finished"
    finally:
        shutdown_distributed()


def _evaluate_only(network: ModuleType, args: argparse.Namespace) -> str:
    """`--eval`: the folder's eval.py on the newest checkpoint in --save (or --eval-resume FILE), so evaluation is
    one code path."""
    if args.demo and not args.val_dir:
        args.val_dir = str(demo_dataset(DEMO_DATA)[1])
    if not args.val_dir:
        raise UserError("--eval needs --val-dir DIR (or --demo)")
    weights = args.eval_resume or get_latest_model(args.save)[0]
    if weights is None:
        raise UserError(f"--eval: no checkpoint in --save {args.save} and no --eval-resume FILE given")
    eval_argv = ["--weights", str(weights), "--val-dir", args.val_dir, "--batch-size", str(args.val_batch_size),
                 "--workers", str(args.workers), "--device", args.device]
    for flag, value in (("--image-size", args.image_size), ("--amp", args.amp)):
        if value is not None:
            eval_argv += [flag, str(value)]
    eval_argv += [flag for flag, given in (("--compile", args.compile), ("--ema", args.ema)) if given]
    folder = Path(network.__file__).resolve().parent
    eval_script = load_module(folder / "eval.py", f"eval_{folder.name.replace('.', '_')}")
    eval_script.main(eval_argv)
    return "finished"


def build_trainer(network: ModuleType, recipe: Recipe, load_checkpoint: Callable[..., dict],
                  args: argparse.Namespace, info: DistInfo) -> Trainer:
    """Check the data, then build `network` and what trains it on this process's device, from the newest checkpoint
    in --save when there is one."""
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} must divide by the {info.world_size} processes")
    seed_everything(args.seed, args.deterministic)
    say = print if info.is_main else (lambda *a, **k: None)
    samples, classes = scan_classes(args, say)
    # The inputs (the samples to train on, --architecture, --pretrained) are checked before --save is made, so a
    # refused command leaves no folder.
    recipe.hooks.train_samples(samples, args)
    del samples
    input_format: InputFormat = network.INPUT_FORMAT
    metadata = {"arch": recipe.model_name, "classes": classes, "num_classes": args.num_classes or len(classes),
                "image_size": args.image_size, "input_format": input_format.to_dict(), "args": plain_args(args),
                "class_to_index": {name: i for i, name in enumerate(classes)}, **recipe.hooks.metadata(args)}
    resume_path = _resume_path(args)
    _settle_network(metadata, args, resume_path, say)
    model = _create_model(network, metadata, args, resume_path, say).to(info.device)
    _prepare_save_folder(args.save, info)
    if args.freeze_backbone:
        recipe = dataclasses.replace(recipe, loss_weights=(1.0,) + (0.0,) * (len(recipe.loss_weights) - 1))
    speed = resolve_training_speed(args, model, info)
    metadata.update(args=plain_args(args), speed=speed.describe())
    say(f"speed settings: {speed.describe()}")
    model = model.to(memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                momentum=args.momentum)
    scaler = torch.amp.GradScaler(info.device.type, enabled=args.amp == "fp16")
    from common.ema import create_ema  # here: it imports timm, which --help need not
    ema = create_ema(model, decay=args.ema_decay) if args.ema else None
    state = {}
    if resume_path is not None:
        state = load_checkpoint(resume_path, model, optimizer=optimizer, scaler=scaler, ema=ema)
        say(f"resumed from {resume_path} at iteration {state['iteration']}")
    val_loader = build_eval_loader(args.val_dir, crop_size=args.image_size, batch_size=args.val_batch_size,
                                   workers=args.workers, rank=info.rank, world_size=info.world_size,
                                   class_to_index=metadata["class_to_index"])[0] if args.val_dir else None
    say(f"{recipe.model_name}: {metadata['num_classes']} classes, {args.total_iters} iterations of global batch "
        f"{args.batch_size} on {info.world_size} x {info.device}, lr {args.learning_rate:g}, image "
        f"{args.image_size}px, input {input_format.describe()}")
    return Trainer(args=args, recipe=recipe, info=info, model=model, optimizer=optimizer, scaler=scaler, ema=ema,
                   preprocess=Preprocess(input_format).to(info.device), metadata=metadata,
                   log=RunLog(args.save, enabled=info.is_main), val_loader=val_loader,
                   start_iteration=state.get("iteration", 0), best_error=state.get("best_metric"))


def _resume_path(args: argparse.Namespace) -> Path | None:
    """The newest good checkpoint in --save to resume from, if resuming and there is one."""
    if not args.auto_continue:
        try:
            held = list_checkpoints(args.save)
        except OSError:
            held = []
        if held:
            raise UserError(f"--save {args.save} holds the checkpoints of a run (newest: {held[-1].path.name}); "
                            "with --no-auto-continue a new run would overwrite and mix with them: give another "
                            "--save, or leave out --no-auto-continue to resume that run")
        return None
    try:
        return get_latest_model(args.save)[0]
    except OSError:  # a --save that cannot be read: prepare_output names it next
        return None


def _settle_network(metadata: dict, args: argparse.Namespace, resume_path: Path | None,
                    say: Callable[..., None]) -> None:
    """Add the network beyond its classes (a searched OneShot's architecture) to `metadata`: the command's, else the
    resumed run's, else the --pretrained file's; then check that a resumed run fits the command."""
    recorded = read_checkpoint_metadata(resume_path) if resume_path else {}
    # A resumed fine-tune reads its own checkpoint: the file it started from may be gone since.
    pretrained = _pretrained_metadata(args.pretrained, metadata["arch"]) if args.pretrained and not resume_path else {}
    if "architecture" not in metadata:
        source = recorded if resume_path else pretrained
        if source.get("architecture"):
            metadata["architecture"] = source["architecture"]
            if not resume_path:
                say("--pretrained: fine-tunes the searched architecture the file holds (from its metadata)")
    if resume_path is not None:
        _check_same_run(recorded, metadata, args)
        _note_changed_settings(recorded.get("args") or {}, args, say)


def _pretrained_metadata(path: str, model_name: str) -> dict:
    if not Path(path).is_file():
        raise UserError(f"--pretrained {path}: " + ("a folder, not a weights file; give the path of the file"
                                                    if Path(path).is_dir() else "no such file; check the path"))
    metadata = read_checkpoint_metadata(path)
    check_model_folder(f"--pretrained {path}", metadata, model_name, "train.py")
    return metadata


def _check_same_run(recorded: dict, metadata: dict, args: argparse.Namespace) -> None:
    """A one-line error when the run to resume (its checkpoint's metadata `recorded`) was started with another network
    or other classes than this command gives: its weights would not fit, or its labels would go to other classes."""
    again = "; resume it with the command that started it, or give another --save for a new run"
    if recorded.get("arch") not in (None, metadata["arch"]):
        raise UserError(f"--save {args.save}: its run trains {recorded['arch']}, not {metadata['arch']}{again}")
    if recorded.get("architecture") != metadata.get("architecture"):
        started = recorded.get("args", {}).get("architecture")
        if started and started == args.architecture:
            raise UserError(f"--architecture {started}: the file has changed since the run in --save {args.save} "
                            f"started with it{again}")
        run = "the released architecture" if "architecture" not in recorded else "another searched architecture"
        raise UserError(f"--save {args.save}: its run trains {run}{f' (--architecture {started})' if started else ''},"
                        f" not the one of --architecture {args.architecture}{again}")
    recorded_classes = recorded.get("classes", metadata["classes"])
    gone = [name for name in recorded_classes if name not in metadata["classes"]]
    new = [name for name in metadata["classes"] if name not in recorded_classes]
    if gone or new:
        differences = [f"{len(gone)} of the run's class folder(s) missing ({listed(gone)})"] if gone else []
        differences += [f"{len(new)} class folder(s) not in the run ({listed(new)})"] if new else []
        raise UserError(f"--train-dir {args.train_dir} does not hold the classes of the run in --save {args.save}: "
                        f"{'; '.join(differences)}{again}")
    if recorded.get("num_classes", metadata["num_classes"]) != metadata["num_classes"]:
        raise UserError(f"--save {args.save}: its run has {recorded['num_classes']} classes, this command "
                        f"{metadata['num_classes']} (--num-classes){again}")


# What a resumed command may change (a lower --learning-rate can continue a diverged run), but not unnoticed.
_RUN_SETTINGS = ("batch_size", "image_size", "learning_rate", "warmup_iters", "momentum", "weight_decay",
                 "label_smooth", "seed", "ema", "ema_decay", "deterministic", "freeze_backbone")


def _note_changed_settings(recorded: dict, args: argparse.Namespace, say: Callable[..., None]) -> None:
    """A note naming the settings in which this command differs from the run it resumes (its newest checkpoint's)."""
    def shown(value) -> str:
        return f"{value:g}" if isinstance(value, (int, float)) else str(value)

    changed = []
    for name in (name for name in _RUN_SETTINGS if name in recorded):
        flag, value = "--" + name.replace("_", "-"), getattr(args, name)
        if recorded[name] != value:
            changed.append(f"{flag} (it ran without)" if value is True else f"no {flag} (it ran with it)"
                           if value is False else f"{flag} {shown(value)} (it ran with {shown(recorded[name])})")
    if changed:
        say(f"note: this command continues the run in --save {args.save} with {', '.join(changed)}")


def _prepare_save_folder(save: str, info: DistInfo) -> None:
    """Make --save, where the checkpoints, metrics.jsonl and the TensorBoard events go, and claim it for this run:
    rank 0 writes the checkpoints."""
    prepare_output("--save", save, folder=True)
    prepare_output("--save", Path(save) / "tensorboard", folder=True)
    checked_on_main(lambda: claim_output(Path(save) / ".lock", lambda holder: (
        f"--save {save}: another training run is writing its checkpoints there{holder}; wait for it to end or "
        "choose another --save")), info)


def _create_model(network: ModuleType, metadata: dict, args: argparse.Namespace, resume_path: Path | None,
                  say: Callable[..., None]) -> nn.Module:
    """The network as the metadata describes it; a new run with --pretrained starts from that file's weights."""
    model = create_network_for(network, metadata["num_classes"], metadata)
    if args.pretrained and resume_path is None:
        # Only a run without checkpoints of its own starts from the file: a resumed one continues its own weights.
        from common.pretrained import load_pretrained
        try:
            say(f"--pretrained: {load_pretrained(model, args.pretrained).summary()}")
        except WeightsMismatchError:
            if not getattr(args, "architecture", None):
                raise
            raise UserError(f"--pretrained {args.pretrained} holds another architecture than --architecture "
                            f"{args.architecture}, and weights fit only the architecture they were trained in: leave "
                            "out --architecture to fine-tune the file's, or train this one without --pretrained"
                            ) from None
    if args.freeze_backbone:
        model.freeze_backbone()
    return model


def finish(trainer: Trainer) -> None:
    """After the schedule: optional BN re-estimation and best-K averaging, then the curves plot. Every rank takes part
    (validation and BN re-estimation are spread over the ranks); only the main rank writes files."""
    args, info = trainer.args, trainer.info
    if args.bn_recalibrate and not trainer.metadata.get("bn_recalibrated"):
        _recalibrate_batchnorm(trainer, args.bn_recalibrate)
        trainer.metadata["bn_recalibrated"] = True
        trainer.save(args.total_iters, trainer.validate(args.total_iters, split="val_bn_recalibrated"))
    if args.average_best:
        # The main rank's last checkpoint must be on disk before any rank picks the best ones.
        barrier(info)
        _average_best(trainer)
    trainer.log.close()
    metrics_path = Path(args.save) / "metrics.jsonl"
    if info.is_main and metrics_path.exists():
        trainer.say(f"curves: {plot_curves(metrics_path, Path(args.save) / 'curves.png', trainer.recipe.model_name)}")


def _recalibrate_batchnorm(trainer: Trainer, num_batches: int) -> None:
    """Re-estimate BatchNorm statistics over `num_batches` global batches of training images (another seed than
    training's), each rank over its part, then the ranks' statistics averaged."""
    from common.bn_recalibrate import recalibrate_batchnorm

    # The autocast is entered here, not around a generator's `yield`: a generator left suspended inside a context
    # manager restores the grad mode and autocast state whenever it happens to be closed, not when the work ends.
    def forward(model: nn.Module, images: torch.Tensor):
        with trainer.autocast():
            return model(trainer.preprocess(images.to(trainer.info.device), trainer.memory_format))

    batches = (images for images, _, _ in trainer.train_loader(seed=trainer.args.seed + 1))
    recalibrate_batchnorm(trainer.model, batches, num_batches, forward)
    average_buffers(trainer.model, trainer.info)


def _average_best(trainer: Trainer) -> None:
    from common.average import (average_checkpoints, average_metadata, note_batchnorm_statistics,
                                select_best_checkpoints)
    args, k = trainer.args, trainer.args.average_best
    paths = [c.path for c in select_best_checkpoints(args.save, k, "top1_error", lower_is_better=True)]
    output = Path(args.save) / f"average-best-{k}.safetensors"
    # Every rank averages the same files itself (no rank waits on another's file); only the main rank writes.
    load_model_state(trainer.model, average_checkpoints(paths, progress=trainer.info.is_main), source_name=str(output))
    # The inputs and their metrics; the average's own score is only what is measured on it.
    metadata = average_metadata(paths)
    _release_validated(trainer, output, f"val_average_best_{k}", metadata,
                       f"averaged the best {len(paths)} checkpoints")
    if not args.recompute_bn:
        if trainer.info.is_main:
            note_batchnorm_statistics(len(paths))
        return
    _recalibrate_batchnorm(trainer, args.recompute_bn)
    metadata["batchnorm_statistics"] = f"re-estimated over {args.recompute_bn} training batches"
    _release_validated(trainer, output.with_name(output.stem + "-recomputed-bn.safetensors"),
                       f"val_average_best_{k}_recomputed_bn", metadata,
                       "re-estimated the average's BatchNorm statistics")


def _release_validated(trainer: Trainer, output: Path, split: str, metadata: dict, what: str) -> None:
    """Validate the model as `split` and release it with that measured score (none without --val-dir)."""
    from common.release import write_release
    metrics = trainer.validate(trainer.args.total_iters, split=split)
    if trainer.info.is_main:
        validation = {"validation": {"split": split, **metrics}} if metrics else {}
        write_release(output, trainer.model.state_dict(), {**metadata, **validation})
        print(f"{what} into {output}")
