"""train.py's optional training flags, through OneShot's train.py (main() or the script) on real tiny ImageFolder
data, each checked by something that fails when the flag is ignored: --ema (the saved and validated average is not
the raw weights, and `--eval --ema` scores it), --amp bf16 (the forward pass ran in bfloat16), --bn-recalibrate (the
saved BatchNorm statistics are re-estimated over exactly N batches, nothing else changed) and --compile (TorchDynamo
compiled the network and the run finished with a finite loss; with dynamo's eager backend, no code generation)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import training
from common.checkpoint_store import get_latest_model, save_checkpoint
from common.model_state import read_checkpoint_metadata, read_weights_file
from conftest import network, script_module
from test_train import run

# 32px, 4 iterations of 8 images: a few seconds. A high learning rate moves the weights far enough in 4 steps for
# the EMA (with warm-up) to score differently from the raw weights.
FLAGS = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--display-interval", "1",
         "--total-iters", "4", "--save-interval", "4", "--learning-rate", "0.1", "--no-channels-last"]


@pytest.fixture(scope="module")
def oneshot_train():
    return script_module("OneShot", "train")


def records(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def train(oneshot_train, argv: list[str]) -> str:
    """train.py's main() on one thread, as the subprocess tests run (OMP_NUM_THREADS=1): on a busy machine more
    threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return oneshot_train.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, image_folder, oneshot_train):
    """A run with --ema and a validation set, then the same command with --bn-recalibrate 2, which finds the
    schedule done and does only that. Returns the folder and the last checkpoint as the first run left it."""
    save = tmp_path_factory.mktemp("ema")
    argv = ["--train-dir", str(image_folder), "--val-dir", str(image_folder), "--save", str(save), *FLAGS,
            "--amp", "none", "--ema"]
    assert train(oneshot_train, argv) == "finished"
    before = read_weights_file(get_latest_model(save)[0])
    assert train(oneshot_train, [*argv, "--bn-recalibrate", "2"]) == "finished"
    return save, before


def test_amp_bf16_runs_the_forward_pass_in_bfloat16(tmp_path, image_folder, oneshot_train, monkeypatch):
    seen = []
    compute_loss = training.compute_loss

    def observed(outputs, *args):
        seen.append(outputs.dtype)
        return compute_loss(outputs, *args)

    monkeypatch.setattr(training, "compute_loss", observed)
    # bf16 is emulated (slow) on a CPU without native support: one iteration, no validation.
    argv = ["--train-dir", str(image_folder), "--save", str(tmp_path), *FLAGS, "--total-iters", "1",
            "--save-interval", "1", "--amp", "bf16"]
    assert train(oneshot_train, argv) == "finished"
    assert seen == [torch.bfloat16]
    assert read_checkpoint_metadata(get_latest_model(tmp_path)[0])["args"]["amp"] == "bf16"
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path) if r["split"] == "train")


def test_the_command_of_a_finished_run_says_there_is_no_training_to_do(ema_run, image_folder, oneshot_train, capsys):
    save, _ = ema_run
    newest = get_latest_model(save)
    argv = ["--train-dir", str(image_folder), "--save", str(save), *FLAGS, "--amp", "none", "--ema"]
    capsys.readouterr()
    assert train(oneshot_train, argv) == "finished"
    out = capsys.readouterr().out
    assert f"no training to do: the run in --save {save} is at iteration 4 of --total-iters 4" in out
    assert "iter " not in out and get_latest_model(save) == newest


def test_ema_is_saved_validated_and_what_eval_ema_scores(ema_run, image_folder, oneshot_train, monkeypatch,
                                                         capsys):
    save, before = ema_run
    raw, averaged = before["model"], before["ema"]["module"]
    assert raw.keys() == averaged.keys()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw if raw[k].is_floating_point())
    scores = {r["split"]: r["loss"] for r in records(save) if r["iteration"] == 4}
    assert abs(scores["val_ema"] - scores["val"]) > 0.01

    # --eval runs eval.py, which imports the folder's network as a script run from the folder does.
    monkeypatch.setitem(sys.modules, "network", network("OneShot"))

    def evaluated_loss(*extra: str) -> float:
        capsys.readouterr()
        train(oneshot_train, ["--eval", "--save", str(save), "--val-dir", str(image_folder), "--workers", "0",
                              "--amp", "none", *extra])
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(" * Acc@1"))
        return float(line.split("loss ")[1].split()[0])

    # The last checkpoint holds the recalibrated network and the EMA of the schedule.
    # Relative too: four iterations at this rate can leave the EMA network with enormous losses.
    assert evaluated_loss("--ema") == pytest.approx(scores["val_ema"], rel=1e-4, abs=2e-3)
    assert evaluated_loss() == pytest.approx(scores["val_bn_recalibrated"], rel=1e-4, abs=2e-3)


def test_export_ema_writes_the_ema_weights(ema_run, tmp_path):
    """export.py --ema exports the checkpoint's EMA network, as eval.py --ema scores it; without it the raw one."""
    import onnx
    import onnxruntime

    from common.export import run_export
    from common.input_format import Preprocess
    from common.model_state import load_model_state
    save, _ = ema_run
    checkpoint = get_latest_model(save)[0]
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for use_ema in (False, True):
        output = tmp_path / f"ema-{use_ema}.onnx"
        argv = ["--weights", str(checkpoint), "--format", "onnx", "--output", str(output), "--num-verify-images", "2"]
        assert run_export(network("OneShot"), argv + ["--ema"] * use_ema) == 0
        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"image": images.float().numpy()})[0]
        model = network("OneShot").create_network(num_classes=logits.shape[1]).eval()
        load_model_state(model, checkpoint, use_ema=use_ema)
        other = network("OneShot").create_network(num_classes=logits.shape[1]).eval()
        load_model_state(other, checkpoint, use_ema=not use_ema)
        with torch.no_grad():
            inputs = Preprocess(network("OneShot").INPUT_FORMAT)(images)
            expected, unexpected = model(inputs).numpy(), other(inputs).numpy()
        scale = np.abs(expected).max()
        assert np.abs(logits - expected).max() <= 1e-4 * scale
        assert np.abs(logits - unexpected).max() > 1e-2 * scale
        metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
        assert metadata["weights"] == ("ema" if use_ema else "model")


def test_bn_recalibrate_reestimates_the_saved_statistics_over_n_batches(ema_run):
    save, before = ema_run
    path, iterations = get_latest_model(save)
    after = read_weights_file(path)
    assert iterations == 4 and after["metadata"]["bn_recalibrated"] is True
    statistics = [k for k in before["model"] if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(before["model"][k], after["model"][k]) for k in statistics)
    counts = {after["model"][k].item() for k in before["model"] if k.endswith("num_batches_tracked")}
    assert counts == {2}  # a cumulative average over exactly the 2 batches, not 4 steps of training momentum
    assert all(torch.equal(value, after["model"][k]) for k, value in before["model"].items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert any(r["split"] == "val_bn_recalibrated" for r in records(save))


# train.py run as `python train.py`, with torch.compile on dynamo's eager backend: TorchDynamo captures the
# network's graph and the steps run through it; inductor's code generation is left out (its C++ kernels for
# OneShot's forward and backward took 6 minutes of CPU time here, too long for the suite).
EAGER_COMPILE = """
import functools, runpy, sys
import torch
from torch._dynamo.utils import counters
torch.compile = functools.partial(torch.compile, backend="eager")
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print("dynamo graphs:", counters["stats"]["unique_graphs"])
"""


@pytest.mark.slow  # 20 to 45 s: a fresh process, and TorchDynamo traces OneShot's forward
def test_compile_compiles_the_network_and_finishes_with_a_finite_loss(tmp_path, image_folder):
    result = run([sys.executable, "-c", EAGER_COMPILE, "--train-dir", str(image_folder), "--save", str(tmp_path),
                  *FLAGS, "--total-iters", "2", "--save-interval", "2", "--amp", "none", "--compile"])
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split("dynamo graphs:")[1]) >= 1
    path, _ = get_latest_model(tmp_path)
    assert read_checkpoint_metadata(path)["args"]["compile"] is True
    losses = [r["loss"] for r in records(tmp_path) if r["split"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_a_checkpoint_with_a_scheduler_state_still_resumes(ema_run, tmp_path, image_folder, oneshot_train):
    """Checkpoints written before the learning rate became a function of the iteration hold a scheduler state."""
    _, before = ema_run
    model = network("OneShot").create_network(num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / 4).state_dict()
    save_checkpoint(before, 4, tmp_path)
    argv = ["--train-dir", str(image_folder), "--save", str(tmp_path), *FLAGS, "--amp", "none", "--ema",
            "--total-iters", "5", "--save-interval", "5"]
    assert train(oneshot_train, argv) == "finished"
    assert get_latest_model(tmp_path)[1] == 5
    assert [r["lr"] for r in records(tmp_path) if r["split"] == "train"] == [pytest.approx(0.1 * (1 - 4 / 5))]


def test_eval_forwards_amp_to_eval_py_only_when_given(oneshot_train, monkeypatch, tmp_path):
    """Not given, eval.py's own default applies (float32), so train.py --eval scores what eval.py scores."""
    calls = []

    class EvalScript:
        @staticmethod
        def main(argv: list[str]) -> None:
            calls.append(argv)

    monkeypatch.setattr(training, "load_module", lambda *args: EvalScript)
    for extra in ([], ["--amp", "bf16"], ["--amp", "auto"]):
        oneshot_train.main(["--eval", "--eval-resume", str(tmp_path / "w.pth"), "--val-dir", str(tmp_path), *extra])
    assert [argv[argv.index("--amp") + 1] if "--amp" in argv else None for argv in calls] == [None, "bf16", "auto"]
