"""What a training run writes for people and scripts: metrics.jsonl, TensorBoard events and a PNG of the curves."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from common.atomic_io import atomic_output


class RunLog:
    """Appends one JSON object per record to `<save_dir>/metrics.jsonl` and mirrors scalars to TensorBoard; on ranks
    other than the main one (`enabled=False`) it writes nothing."""

    def __init__(self, save_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(save_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(Path(save_dir) / "tensorboard"))

    def log(self, split: str, iteration: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        record = {"split": split, "iteration": iteration, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{name}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(metrics_path: str | Path, output: str | Path, title: str = "") -> Path:
    """A PNG of training loss and top-1 error, with validation error, against the iteration."""
    records = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a crash
            continue
    figure = curves_figure(records, title)
    import matplotlib.pyplot as plt
    try:
        with atomic_output(output) as temp:  # a full disk keeps the plot of before
            figure.savefig(temp, dpi=100, format="png")
    finally:
        plt.close(figure)
    return Path(output)


def curves_figure(records: list[dict], title: str = ""):
    """The figure of `plot_curves`. Losses are on a log scale: an early validation loss in the thousands (running
    BatchNorm statistics that have not settled yet) would flatten every other point on a linear one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style, label in ((train, "-", "train loss"), (val, "o-", "val loss")):
        points = [(r["iteration"], r["loss"]) for r in split if math.isfinite(r["loss"]) and r["loss"] > 0]
        if points:
            loss_axis.plot(*zip(*points), style, label=label)
    loss_axis.set_yscale("log")
    error_axis.plot([r["iteration"] for r in train], [r["top1_error"] for r in train], label="train top-1 error")
    for key, label in (("top1_error", "val top-1 error"), ("top5_error", "val top-5 error")):
        if val:
            error_axis.plot([r["iteration"] for r in val], [r[key] for r in val], "o-", label=label)
    for axis, ylabel in ((loss_axis, "loss (log scale)"), (error_axis, "error (%)")):
        axis.set_xlabel("iteration")
        axis.set_ylabel(ylabel)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure
