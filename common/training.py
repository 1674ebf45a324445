"""The training loop shared by every model folder's train.py.

Iteration-based, as the original recipes (MODELS.md, "Training recipes"): SGD with momentum, weight decay on
weights of 2 or more dimensions only, label-smoothed cross-entropy (plus weighted side-head losses), a learning
rate that falls linearly to 0 over the total iterations, validation and crash-safe checkpoints at fixed
intervals, and automatic resume from the newest good checkpoint. A folder's train.py declares its `Recipe` and
calls `run_training`.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import torch
from torch import nn

from common.checkpoint import (get_latest_model, get_training_state, list_checkpoints, load_checkpoint,
                               save_checkpoint)
from common.data import build_eval_loader, build_train_loader, scan_image_folder
from common.demo_data import demo_dataset
from common.distributed import (DistInfo, all_gather_objects, all_reduce_sum, any_rank, init_distributed,
                                shutdown_distributed)
from common.errors import UserError, exit_on_user_error
from common.evaluate import evaluate
from common.hardware import AMP_CHOICES, SpeedChoice, resolve_speed, training_step_timer
from common.input_format import InputFormat, Preprocess
from common.model_state import get_model_state_dict, load_model_state, read_checkpoint_metadata, unwrap_model
from common.models import REPO_ROOT
from common.run_log import RunLog, plot_curves


@dataclass(frozen=True)
class DemoRecipe:
    """What `--demo` changes: a few minutes on a laptop CPU with the built-in dataset."""

    batch_size: int = 48
    learning_rate: float = 0.1
    total_iters: int = 200
    image_size: int = 64
    display_interval: int = 10
    # Checkpoints close together near the end, so that averaging the best few (demo.py) is meaningful.
    val_interval: int = 25
    save_interval: int = 25


@dataclass(frozen=True)
class Recipe:
    """A model's training defaults (the original recipe) and what its loss is made of."""

    model_name: str
    batch_size: int
    learning_rate: float
    total_iters: int
    # Weights of the losses of the network's outputs: the logits, then the side heads in the order the network
    # returns them in training mode.
    loss_weights: tuple[float, ...] = (1.0,)
    momentum: float = 0.9
    weight_decay: float = 4e-5
    label_smooth: float = 0.1
    image_size: int = 224
    display_interval: int = 20
    val_interval: int = 10_000
    save_interval: int = 10_000
    demo: DemoRecipe = field(default_factory=DemoRecipe)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# -- command line ---------------------------------------------------------------------------------------------

def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    """The train.py command line; recipe-dependent defaults are None here and filled in by `resolve_args`."""
    d = recipe
    parser = argparse.ArgumentParser(
        description=f"Train {d.model_name} (ImageFolder data, the original recipe; resumes automatically).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", help="training images in ImageFolder layout (one sub-folder per class)")
    data.add_argument("--val-dir", help="validation images, same class sub-folders as --train-dir")
    data.add_argument("--demo", action="store_true",
                      help="train on the built-in demo dataset (generated on first use in data/demo) with the "
                           f"demo recipe: batch {d.demo.batch_size}, {d.demo.total_iters} iterations, "
                           f"{d.demo.image_size}px images; explicit flags still win")
    data.add_argument("--num-classes", type=int, help="number of classes (default: the class folders found)")
    data.add_argument("--image-size", type=int, help=f"training crop size (default {d.image_size})")
    data.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="data-loading worker processes per rank")
    optim = parser.add_argument_group("optimisation (defaults: the original recipe)")
    optim.add_argument("--batch-size", type=int, help=f"global batch over all ranks (default {d.batch_size})")
    optim.add_argument("--total-iters", type=int, help=f"iterations to train (default {d.total_iters})")
    optim.add_argument("--learning-rate", type=float,
                       help=f"base learning rate (default {d.learning_rate} at batch {d.batch_size}, scaled "
                            "linearly with --batch-size)")
    optim.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help="weight decay, applied to weights of 2 or more dimensions only")
    optim.add_argument("--label-smooth", type=float, default=d.label_smooth, help="label smoothing epsilon")
    optim.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    optim.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (slower): a resumed run is bit-identical")
    optim.add_argument("--ema", action="store_true", help="keep and validate an exponential moving average")
    optim.add_argument("--ema-decay", type=float, default=0.9998, help="EMA decay (with warm-up)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    run.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                     help="mixed precision: auto picks bf16 on CUDA (fp16 where bf16 is not supported; fp16 uses a "
                          "gradient scaler), on a CPU bf16 only where it is native and measured faster, else "
                          "float32 (none); a resumed run keeps the choice it started with")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default="auto",
                     help="channels_last memory format; --no-channels-last for NCHW; auto: channels_last on CUDA, "
                          "on a CPU the layout measured faster for this model in a few steps at start (NCHW with "
                          "--deterministic); a resumed run keeps the layout it started with")
    run.add_argument("--compile", action="store_true", help="torch.compile the network")
    run.add_argument("--save", default="./models", help="checkpoint folder (also metrics.jsonl, TensorBoard)")
    run.add_argument("--keep", type=int, default=5, help="newest checkpoints to keep (the best one is kept too)")
    run.add_argument("--auto-continue", action=argparse.BooleanOptionalAction, default=True,
                     help="resume from the newest good checkpoint in --save")
    run.add_argument("--display-interval", type=int, help=f"iterations between progress lines "
                                                          f"(default {d.display_interval})")
    run.add_argument("--val-interval", type=int, help=f"iterations between validations (default {d.val_interval})")
    run.add_argument("--save-interval", type=int,
                     help=f"iterations between checkpoints (default {d.save_interval})")
    run.add_argument("--val-batch-size", type=int, default=100, help="validation batch size per rank")
    run.add_argument("--eval", action="store_true",
                     help="only evaluate (the newest checkpoint in --save, or --eval-resume FILE) and exit")
    run.add_argument("--eval-resume", help="weights file to evaluate with --eval (any released layout)")
    end = parser.add_argument_group("after the main schedule")
    end.add_argument("--bn-recalibrate", type=int, default=0, metavar="N",
                     help="re-estimate BatchNorm statistics over N training batches (OneShot's original: 1250)")
    end.add_argument("--average-best", type=int, default=0, metavar="K",
                     help="write and validate the average of the best K checkpoints by validation top-1 error, "
                          "chosen among those still on disk (raise --keep to keep more)")
    end.add_argument("--recompute-bn", type=int, default=0, metavar="N",
                     help="re-estimate BatchNorm statistics of the averaged weights over N training batches")
    return parser


def resolve_args(args: argparse.Namespace, recipe: Recipe) -> argparse.Namespace:
    """Fill recipe defaults (demo ones with --demo) and check the values before any work starts."""
    source = recipe.demo if args.demo else recipe
    for name in ("batch_size", "total_iters", "image_size", "display_interval", "val_interval", "save_interval"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(source, name))
    if args.learning_rate is None:
        args.learning_rate = source.learning_rate * args.batch_size / source.batch_size
    if args.demo:
        train_dir, val_dir = demo_dataset(REPO_ROOT / "data" / "demo")
        args.train_dir = args.train_dir or str(train_dir)
        args.val_dir = args.val_dir or str(val_dir)
    if not args.train_dir and not args.eval:
        raise UserError("--train-dir is required (or --demo for the built-in dataset)")
    for name in ("batch_size", "total_iters", "image_size", "display_interval", "val_interval", "save_interval",
                 "keep", "val_batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.image_size % 32:
        raise UserError(f"--image-size {args.image_size}: use a multiple of 32")
    if args.learning_rate <= 0 or not math.isfinite(args.learning_rate):
        raise UserError(f"--learning-rate {args.learning_rate}: must be a positive number")
    return args


# -- pieces of the loop ---------------------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on parameters named `weight` with 2 or more dimensions (no BN, no biases)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if parameter.ndim >= 2 and "weight" in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_decay(total_iters: int) -> Callable[[int], float]:
    """Iteration k trains with lr * (1 - k / total)."""
    return lambda k: max(0.0, 1.0 - k / total_iters)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and leave after the current iteration.

    SIGUSR2 is SLURM's (and submitit's) warning before preemption or time-out. A second Ctrl-C interrupts at
    once; the last complete checkpoint stays intact either way.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR2", None)):
            if signum is not None:
                signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: saving a checkpoint after this iteration, then stopping "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def resolve_training_speed(args: argparse.Namespace, model: nn.Module, info: DistInfo) -> SpeedChoice:
    """Set `args.channels_last` (bool) and `args.amp` (None for float32, "bf16" or "fp16") from their flags.

    Explicit flags win. "auto" takes the settings the run's newest checkpoint recorded (a resumed run computes
    as it did before), else resolves by the device, timing the candidates on a CPU (rank 0 measures for all;
    with --deterministic nothing is timed: plain float32 NCHW there).
    """
    recorded = _recorded_args(args.save) if args.auto_continue and not args.eval else {}
    kept = []
    if args.channels_last == "auto":
        args.channels_last = None
    if args.channels_last is None and isinstance(recorded.get("channels_last"), bool):
        args.channels_last = recorded["channels_last"]
        kept.append("layout")
    if args.amp == "auto" and "amp" in recorded:
        args.amp = recorded["amp"]
        kept.append("precision")
    batch = min(8, args.batch_size // info.world_size)
    prepare = None
    if info.is_main and not (args.eval or args.deterministic):
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


@dataclass
class Trainer:
    """Everything the loop works on, so saving and validating read like the recipe."""

    args: argparse.Namespace
    recipe: Recipe
    info: DistInfo
    model: nn.Module
    train_model: nn.Module
    preprocess: Preprocess
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    metadata: dict
    log: RunLog
    best_error: float | None = None

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.amp)
        return torch.autocast(self.info.device.type, dtype=dtype, enabled=dtype is not None)

    def save(self, iteration: int, metrics: dict | None, data_position: dict) -> None:
        # Every rank's RNG is stored, so a resumed multi-process run continues each rank's own random stream.
        rank_rng = all_gather_objects(rank_rng_state(), self.info)
        if not self.info.is_main:
            return
        state = get_training_state(self.model, self.optimizer, self.scheduler, self.scaler, self.ema,
                                   iteration=iteration, best_metric=self.best_error, data_position=data_position,
                                   metrics=metrics, metadata=self.metadata)
        state["rank_rng"] = rank_rng
        started = time.perf_counter()
        path = save_checkpoint(state, iteration, self.args.save, keep=self.args.keep,
                               best_metric_name="top1_error", lower_is_better=True)
        print(f"saved {path} ({time.perf_counter() - started:.1f} s)", flush=True)

    def validate(self, iteration: int, model: nn.Module | None = None, split: str = "val") -> dict | None:
        if not self.args.val_dir:
            return None
        loader, _, _ = build_eval_loader(
            self.args.val_dir, crop_size=self.args.image_size, batch_size=self.args.val_batch_size,
            workers=self.args.workers, rank=self.info.rank, world_size=self.info.world_size,
            class_to_index=self.metadata["class_to_index"])
        network = model if model is not None else self.model
        results = evaluate(network, self.preprocess, loader, device=self.info.device, amp=self.args.amp,
                           progress=False)
        metrics = {key: results[key] for key in ("top1_error", "top5_error", "loss")}
        self.log.log(split, iteration, metrics)
        if self.info.is_main:
            print(f"{split} @ {iteration}: top-1 error {metrics['top1_error']:.2f}%  top-5 error "
                  f"{metrics['top5_error']:.2f}%  loss {metrics['loss']:.4f}  ({results['images']} images)",
                  flush=True)
        return metrics


def rank_rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rank_rng(state: dict, info: DistInfo) -> None:
    """Each rank takes back its own RNG (when the number of ranks is unchanged)."""
    per_rank = state.get("rank_rng")
    if not per_rank or len(per_rank) != info.world_size:
        return
    mine = per_rank[info.rank]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])


def weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def compute_loss(outputs, labels: torch.Tensor, criterion: nn.Module, weights: tuple[float, ...]):
    """Weighted sum of the label-smoothed losses of every output; returns (loss, main logits)."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(outputs) != len(weights):
        raise RuntimeError(f"the network returned {len(outputs)} outputs but the recipe weighs {len(weights)}")
    loss = sum(weight * criterion(output.float(), labels) for weight, output in zip(weights, outputs))
    return loss, outputs[0]


# -- the loop -------------------------------------------------------------------------------------------------

LoadCheckpoint = Callable[..., dict]


def load_training_checkpoint(path: str | Path, model: nn.Module, *, for_inference: bool = False,
                             side_heads_optional: bool = False, **objects) -> dict:
    """Resume: restore the whole training state of one of this project's checkpoints into `model` and `objects`
    (optimizer, scheduler, scaler, ema). For inference (`--eval`): weights only, from any accepted file layout;
    `side_heads_optional` lets files without the training-only `predict_*` heads load."""
    if for_inference:
        load_model_state(model, path, for_inference=side_heads_optional)
        return {"iteration": read_checkpoint_metadata(path).get("iteration", 0)}
    return load_checkpoint(path, model, **objects)


def run_training(network: ModuleType, recipe: Recipe, load_checkpoint: LoadCheckpoint,
                 argv: list[str] | None = None) -> str:
    """Parse the command line and train (or only evaluate with --eval). Bad input ends with a one-line error.

    Returns "finished", or "stopped" when a signal ended the run early after saving a checkpoint.
    """
    return exit_on_user_error(_run)(network, recipe, load_checkpoint, argv)


def _run(network: ModuleType, recipe: Recipe, load_checkpoint: LoadCheckpoint, argv: list[str] | None) -> str:
    args = resolve_args(build_parser(recipe).parse_args(argv), recipe)
    info = init_distributed(args.device)
    try:
        return train(network, recipe, load_checkpoint, args, info)
    finally:
        shutdown_distributed()


def train(network: ModuleType, recipe: Recipe, load_checkpoint: LoadCheckpoint, args: argparse.Namespace,
          info: DistInfo) -> str:
    """Train `network` (a folder's network.py module) with `recipe` as `args` say, on this process's device."""
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} must divide by the {info.world_size} processes")
    seed_everything(args.seed, args.deterministic)
    say = print if info.is_main else (lambda *a, **k: None)

    classes = scan_image_folder(args.train_dir, "--train-dir")[1] if args.train_dir else None
    if args.val_dir:
        scan_image_folder(args.val_dir, "--val-dir")
    num_classes = args.num_classes or (len(classes) if classes else 1000)
    if classes and num_classes < len(classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(classes)} class folders "
                        f"of --train-dir")
    input_format: InputFormat = network.INPUT_FORMAT
    metadata = {"arch": recipe.model_name, "classes": classes, "num_classes": num_classes,
                "image_size": args.image_size, "input_format": input_format.to_dict(), "args": plain_args(args),
                "class_to_index": {name: i for i, name in enumerate(classes)} if classes else None}

    model = network.create_network(num_classes).to(info.device)
    speed = resolve_training_speed(args, model, info)
    metadata.update(args=plain_args(args), speed=speed.describe())
    say(f"speed settings: {speed.describe()}")
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    model = model.to(memory_format=memory_format)
    preprocess = Preprocess(input_format).to(info.device)
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(args.total_iters))
    scaler = torch.amp.GradScaler(info.device.type, enabled=args.amp == "fp16")
    ema = None
    if args.ema:
        from common.ema import create_ema
        ema = create_ema(model, decay=args.ema_decay)
    log = RunLog(args.save, enabled=info.is_main)
    trainer = Trainer(args, recipe, info, model, model, preprocess, optimizer, scheduler, scaler, ema,
                      metadata, log)

    if args.eval:
        path = args.eval_resume or get_latest_model(args.save)[0]
        if path is None:
            raise UserError(f"--eval: no checkpoint in {args.save} and no --eval-resume FILE given")
        state = load_checkpoint(path, model, for_inference=True)
        trainer.validate(state.get("iteration", 0))
        return "finished"

    start_iteration = 0
    if args.auto_continue:
        path, _ = get_latest_model(args.save)
        if path is not None:
            state = load_checkpoint(path, model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema)
            restore_rank_rng(state, info)
            start_iteration = state["iteration"]
            # The command line's learning rate wins over the saved one: after a divergence, rerunning with a
            # lower --learning-rate continues from the last good checkpoint at that rate. The same command
            # gives the same rate, so an ordinary resume is unchanged.
            scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * linear_decay(args.total_iters)(start_iteration)
            trainer.best_error = state.get("best_metric")
            say(f"resumed from {path} at iteration {start_iteration}")

    if info.distributed:
        trainer.train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if args.compile:
        trainer.train_model = torch.compile(trainer.train_model)

    say(f"{recipe.model_name}: {num_classes} classes, {args.total_iters} iterations of global batch "
        f"{args.batch_size} on {info.world_size} x {info.device}, lr {args.learning_rate:g}, image "
        f"{args.image_size}px, input {input_format.describe()}")
    if start_iteration < args.total_iters and not _train_iterations(trainer, start_iteration):
        trainer.log.close()
        return "stopped"
    _finish(trainer)
    return "finished"


def _train_iterations(trainer: Trainer, start_iteration: int) -> bool:
    """Train from `start_iteration` to the end; False when a signal stopped the run early (after saving)."""
    args, info, recipe = trainer.args, trainer.info, trainer.recipe
    loader, _ = build_train_loader(
        args.train_dir, crop_size=args.image_size, global_batch_size=args.batch_size, seed=args.seed,
        start_iteration=start_iteration, rank=info.rank, world_size=info.world_size, workers=args.workers,
        pin_memory=info.device.type == "cuda")
    sampler = loader.batch_sampler
    batches = iter(loader)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smooth)
    stop = StopRequest()
    trainer.train_model.train()
    nonfinite = torch.zeros((), dtype=torch.bool, device=info.device)
    window_loss = torch.zeros((), device=info.device)
    window_correct = torch.zeros((), device=info.device)
    window_iterations = window_images = window_skipped = 0
    window_start = run_start = time.perf_counter()
    last_saved = start_iteration

    for iteration in range(start_iteration, args.total_iters):
        images, labels, skipped = next(batches)
        images = images.to(info.device, non_blocking=True)
        labels = labels.to(info.device, non_blocking=True)
        with trainer.autocast():
            inputs = trainer.preprocess(images)
            if args.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            loss, logits = compute_loss(trainer.train_model(inputs), labels, criterion, recipe.loss_weights)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update(trainer.model, step=iteration + 1)

        # Tallied on the device; read back only at display time, so a GPU never waits per iteration.
        loss = loss.detach()
        nonfinite |= ~torch.isfinite(loss)
        window_loss += loss
        window_correct += (logits.detach().argmax(1) == labels).sum()
        window_iterations += 1
        window_images += labels.numel()
        window_skipped += skipped
        done = iteration + 1
        stopping = any_rank(stop.signal_name is not None, info)
        if done % args.display_interval == 0 or done == args.total_iters or stopping or \
                done % args.save_interval == 0 or done % args.val_interval == 0:
            if any_rank(bool(nonfinite) or not weights_finite(trainer.model), info):
                raise TrainingDiverged(
                    f"the loss or the weights became NaN or infinite after iteration {last_saved} (noticed at "
                    f"{done}); nothing "
                    f"after the checkpoint at iteration {last_saved} was saved, so it stays the latest. Lower "
                    f"--learning-rate, or use --amp bf16 instead of fp16")
            if done % args.display_interval == 0 or done == args.total_iters:
                elapsed = time.perf_counter() - window_start
                # Means over all ranks, so the log shows the global batch whatever the number of processes.
                tally = all_reduce_sum(torch.stack([window_loss, window_correct,
                                                    torch.tensor(float(window_images), device=info.device)]), info)
                mean_loss = tally[0].item() / window_iterations / info.world_size
                images = int(tally[2].item())
                top1_error = 100.0 * (1.0 - tally[1].item() / max(1, images))
                images_per_s = images / max(elapsed, 1e-9)
                per_iteration = (time.perf_counter() - run_start) / (done - start_iteration)
                eta = format_duration(per_iteration * (args.total_iters - done))
                lr = trainer.optimizer.param_groups[0]["lr"]
                trainer.log.log("train", done, {"loss": mean_loss, "top1_error": top1_error, "lr": lr,
                                                "images_per_second": images_per_s, "skipped": window_skipped})
                if info.is_main:
                    note = f" | skipped {window_skipped} unreadable images" if window_skipped else ""
                    print(f"[{recipe.model_name}] iter {done}/{args.total_iters} | lr {lr:.5f} | loss "
                          f"{mean_loss:.4f} | top-1 err {top1_error:5.1f}% | {images_per_s:7.1f} img/s | "
                          f"ETA {eta}{note}", flush=True)
                window_loss.zero_()
                window_correct.zero_()
                window_iterations = window_images = window_skipped = 0
                window_start = time.perf_counter()
            metrics = None
            paused = time.perf_counter()
            if done % args.val_interval == 0 or done == args.total_iters:
                metrics = trainer.validate(done)
                if trainer.ema is not None:
                    trainer.validate(done, unwrap_model(trainer.ema), split="val_ema")
                trainer.train_model.train()
                if metrics and (trainer.best_error is None or metrics["top1_error"] < trainer.best_error):
                    trainer.best_error = metrics["top1_error"]
            if done % args.save_interval == 0 or done == args.total_iters or stopping:
                trainer.save(done, metrics, sampler.data_position(done))
                last_saved = done
            # Validation and saving are not training: keep them out of images/s and the ETA.
            paused = time.perf_counter() - paused
            window_start += paused
            run_start += paused
        if stopping:
            if info.is_main:
                print(f"stopped at iteration {done} ({stop.signal_name}); run the same command to resume",
                      flush=True)
            return False
    return True


def _finish(trainer: Trainer) -> None:
    """After the schedule: optional BN re-estimation and best-K averaging, then the curves plot."""
    args, info = trainer.args, trainer.info
    if args.bn_recalibrate:
        from common.bn_recalibrate import recalibrate_batchnorm
        if not trainer.metadata.get("bn_recalibrated"):
            recalibrate_batchnorm(trainer.model, _preprocessed_batches(trainer), args.bn_recalibrate)
            trainer.metadata["bn_recalibrated"] = True
            metrics = trainer.validate(args.total_iters, split="val_bn_recalibrated")
            trainer.save(args.total_iters, metrics, {"iteration": args.total_iters})
    if args.average_best and info.is_main:
        _average_best(trainer)
    if info.is_main:
        trainer.log.close()
        metrics_path = Path(args.save) / "metrics.jsonl"
        if metrics_path.exists():
            plot = plot_curves(metrics_path, Path(args.save) / "curves.png", trainer.recipe.model_name)
            print(f"curves: {plot}")


def _preprocessed_batches(trainer: Trainer):
    """Training batches (the original augmentation) in the network's input format, for BN re-estimation."""
    args = trainer.args
    loader, _ = build_train_loader(args.train_dir, crop_size=args.image_size, global_batch_size=args.batch_size,
                                   seed=args.seed + 1, rank=trainer.info.rank, world_size=trainer.info.world_size,
                                   workers=args.workers)
    for images, _, _ in loader:
        with torch.no_grad(), trainer.autocast():
            yield trainer.preprocess(images.to(trainer.info.device))


def _average_best(trainer: Trainer) -> None:
    from common.average import average_checkpoints, select_best_checkpoints
    args = trainer.args
    chosen = select_best_checkpoints(args.save, args.average_best, "top1_error", lower_is_better=True)
    output = Path(args.save) / f"average-best-{args.average_best}.safetensors"
    average_checkpoints([c.path for c in chosen], output)
    load_model_state(trainer.model, output)
    split = f"val_average_best_{args.average_best}"
    if args.recompute_bn:
        from common.bn_recalibrate import recalibrate_batchnorm
        from common.release import write_release
        trainer.validate(args.total_iters, split=split)
        recalibrate_batchnorm(trainer.model, _preprocessed_batches(trainer), args.recompute_bn)
        output = output.with_name(output.stem + "-recomputed-bn.safetensors")
        write_release(output, get_model_state_dict(trainer.model), trainer.metadata)
        split += "_recomputed_bn"
    print(f"averaged the best {len(chosen)} checkpoints into {output}")
    trainer.validate(args.total_iters, split=split)
