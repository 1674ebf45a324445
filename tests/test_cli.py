"""What the scripts say: help texts, the flags their messages name, the published figures, --image-size, --best,
where the shared tools run from, MODELS.md citations and --help imports."""
from __future__ import annotations

import argparse
import ast
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from common import average, export, release, submit, training
from common.demo_data import make_image_folder
from common.evaluate import build_parser as eval_parser
from common.imagenet import imagenet_wnids
from conftest import REPO_ROOT, network, script_module, user_error_line

MODELS = ("OneShot", "ShuffleNetV2.Large", "ShuffleNetV2.ExLarge")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")


def parsers() -> dict[str, argparse.ArgumentParser]:
    built = {"eval": eval_parser("OneShot"), "export": export._parser("OneShot", network("OneShot").INPUT_FORMAT),
             "average": average.build_parser(), "release": release.build_parser(), "submit": submit.build_parser()}
    for model in MODELS:
        built[f"train {model}"] = training.build_parser(script_module(model, "train").RECIPE)
    return built


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


# -- help texts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["eval", "export", "average", "release", "submit",
                                  *(f"train {m}" for m in MODELS)])
def test_help_states_each_default_once_and_never_none(name):
    parser = parsers()[name]
    assert "(default: None)" not in parser.format_help()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            text = formatter._expand_help(action)
            assert text.count("default") <= 1, f"{action.option_strings}: {text}"
            # A value the flag takes when not given is stated (an unset option or an off switch needs no word).
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in text, f"{action.option_strings} does not state its default: {text}"


# -- flags named in messages exist ------------------------------------------------------------------------------

# The scripts whose output can show each module's texts. A message of a module names flags of those scripts.
SHOWN_BY = {
    # train.py --eval runs eval.py with eval.py's own flags.
    "common/training.py": ["train", "eval"], "common/checkpoint.py": ["train"], "common/run_log.py": ["train"],
    "common/checkpoint_store.py": ["train"],
    "common/evaluate.py": ["eval"], "common/imagenet.py": ["eval"],
    "common/export.py": ["export"], "common/coreml_verify.py": ["export"],
    "common/input_format.py": ["eval", "export"],
    "common/data.py": ["train", "eval"], "common/distributed.py": ["train", "eval"],
    # A supernet given as weights is sent to search.py and train.py --architecture.
    "common/model_state.py": ["eval", "release", "average", "search", "train"],
    "common/release.py": ["release"], "common/cli.py": ["train", "eval", "export", "average", "release"],
    # The averaging command points to train.py's own averaging and BatchNorm re-estimation.
    "common/average.py": ["average", "train"],
}


def string_flags(path: Path) -> set[str]:
    """Flags named in the string literals of a source file (messages, help texts, docstrings)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(FLAG.findall(node.value))
    return found


def test_every_flag_a_message_names_exists_in_the_script_that_shows_it(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "OneShot"))  # search.py's own modules (search_space, supernet)
    built = parsers()
    by_script = {"eval": flags(built["eval"]), "export": flags(built["export"]), "average": flags(built["average"]),
                 "release": flags(built["release"]), "train": flags(built["train OneShot"]),
                 "search": flags(script_module("OneShot", "search").build_parser())}
    missing = {}
    for module, scripts in SHOWN_BY.items():
        known = set().union(*(by_script[script] for script in scripts))
        unknown = string_flags(REPO_ROOT / module) - known
        if unknown:
            missing[module] = sorted(unknown)
    for model in MODELS:
        for script in ("train", "eval", "export"):
            known = by_script[script] | {"--help", "--nproc_per_node"}
            unknown = string_flags(REPO_ROOT / model / f"{script}.py") - known
            if unknown:
                missing[f"{model}/{script}.py"] = sorted(unknown)
    assert not missing


def test_ema_is_spelled_the_same_in_every_script_that_reads_ema_weights():
    built = parsers()
    for name in ("eval", "export", "average", "release"):
        assert "--ema" in flags(built[name]), name


# -- eval.py and export.py ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "oneshot.pth"
    torch.save(network("OneShot").create_network(1000).state_dict(), path)
    return path


def test_published_errors_only_beside_a_score_on_all_imagenet_classes(tmp_path, imagenet_weights, capsys):
    """The published ImageNet errors are of 1000 classes: not shown beside a score on 3 of them."""
    evaluate = script_module("OneShot", "eval").main
    full = tmp_path / "full"
    three = make_image_folder(tmp_path / "three", num_classes=3, images_per_class=1, size=32)
    for folder, wnid in zip(sorted(three.iterdir()), imagenet_wnids()):
        folder.rename(three / wnid)
    image = next(three.rglob("*.jpg")).read_bytes()
    for wnid in imagenet_wnids():
        (full / wnid).mkdir(parents=True)
        (full / wnid / "image.jpg").write_bytes(image)
    argv = ["--weights", str(imagenet_weights), "--image-size", "32", "--workers", "0"]
    evaluate([*argv, "--val-dir", str(three), "--results-json", str(tmp_path / "three.json")])
    assert "published error" not in capsys.readouterr().out
    assert '"published": null' in (tmp_path / "three.json").read_text()
    evaluate([*argv, "--val-dir", str(full), "--limit", "3"])
    assert "[published error: top-1 25.1, top-5 8.0]" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["eval", "export", "predict"])
def test_image_size_not_a_multiple_of_32_is_refused(script, imagenet_weights, tmp_path, capsys):
    module = script_module("OneShot", script)
    main = (lambda argv: module.run_export(network("OneShot"), argv)) if script == "export" else module.main
    argv = ["--weights", str(imagenet_weights), "--image-size", "200"]
    if script == "eval":
        argv += ["--val-dir", str(tmp_path)]
    if script == "predict":
        argv += [str(tmp_path)]
    line = user_error_line(capsys, main, argv)
    assert line.startswith("error: --image-size 200: use a multiple of 32")


@pytest.mark.parametrize("script", ["eval", "export", "predict"])
def test_a_checkpoint_of_another_model_folder_names_that_folders_script(script, tmp_path, capsys):
    """eval.py, export.py and predict.py send a file of another model folder to that folder's script (export.py
    before it checks its --output, here one it cannot write)."""
    path = tmp_path / "oneshot.pth"
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.jpg")
    torch.save({"format": "shufflenet-series/training-checkpoint/1", "iteration": 1, "model": {},
                "metadata": {"arch": "OneShot"}}, path)
    module = script_module("ShuffleNetV2.Large", script)
    main = (lambda argv: module.run_export(network("ShuffleNetV2.Large"), argv)) if script == "export" else module.main
    argv = {"eval": ["--val-dir", str(tmp_path)], "export": ["--output", str(tmp_path / "no" / "x.mlpackage")],
            "predict": [str(tmp_path / "photo.jpg")]}[script]
    line = user_error_line(capsys, main, ["--weights", str(path), *argv])
    assert line == f"error: --weights {path}: a OneShot checkpoint; use OneShot/{script}.py"


def test_export_of_a_file_that_is_not_weights_names_the_file_not_the_val_dir(tmp_path, capsys):
    """export.py took a file it could not read as ImageNet weights, and so said --val-dir's folders were not
    ImageNet wnids."""
    not_weights = tmp_path / "curves.png"
    Image.new("RGB", (40, 30)).save(not_weights)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "val" / "cat" / "photo.jpg")
    module = script_module("OneShot", "export")
    line = user_error_line(capsys, lambda argv: module.run_export(network("OneShot"), argv),
                           ["--weights", str(not_weights), "--val-dir", str(tmp_path / "val")])
    assert line.startswith(f"error: {not_weights} is not a PyTorch or safetensors weights file")


@pytest.mark.parametrize("script", ["eval", "export", "predict"])
def test_a_supernet_checkpoint_is_sent_to_the_search(script, tmp_path, capsys):
    """A checkpoint of train_supernet.py given as --weights is sent to search.py, not to a folder that does not
    exist (it was 'use OneShot-supernet/eval.py')."""
    path = tmp_path / "supernet.pth"
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.jpg")
    torch.save({"format": "shufflenet-series/training-checkpoint/1", "iteration": 1, "model": {},
                "metadata": {"arch": "OneShot-supernet", "supernet": {"flops_min": 0, "flops_max": 1}}}, path)
    module = script_module("OneShot", script)
    main = (lambda argv: module.run_export(network("OneShot"), argv)) if script == "export" else module.main
    argv = {"eval": ["--val-dir", str(tmp_path)], "export": ["--output", str(tmp_path / "x.onnx")],
            "predict": [str(tmp_path / "photo.jpg")]}[script]
    line = user_error_line(capsys, main, ["--weights", str(path), *argv])
    assert line == (f"error: --weights {path}: a supernet of OneShot/train_supernet.py, not one network; search it "
                    "with OneShot/search.py --supernet, then train the architecture found with OneShot/train.py "
                    "--architecture")


@pytest.fixture(scope="module")
def damaged_checkpoint(tmp_path_factory) -> Path:
    """A OneShot training checkpoint with one byte of its weights flipped after saving."""
    from common.checkpoint import get_training_state
    from common.checkpoint_store import save_checkpoint
    model = network("OneShot").create_network()
    metadata = {"arch": "OneShot", "num_classes": 1000, "image_size": 224}
    path = save_checkpoint(get_training_state(model, iteration=2, metadata=metadata), 2,
                           tmp_path_factory.mktemp("damaged"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("script", ["eval", "export", "predict", "train", "average", "release"])
def test_a_damaged_checkpoint_is_refused_before_any_work(script, damaged_checkpoint, tmp_path, capsys):
    """A checkpoint whose bytes no longer match its sidecar's SHA-256 would otherwise be evaluated, exported,
    fine-tuned from, averaged or released without a word (the flipped byte is in the middle of the weights)."""
    make_image_folder(tmp_path / "images", num_classes=2, images_per_class=1, size=32)
    if script in ("average", "release"):
        main = {"average": average.main, "release": release.main}[script]
    else:
        module = script_module("OneShot", script)
        main = (lambda argv: module.run_export(network("OneShot"), argv)) if script == "export" else module.main
    out = tmp_path / "out"  # every output goes into this folder, which a refused command must not make
    argv = {"average": ["--inputs", str(damaged_checkpoint), "--output", str(out / "x.safetensors")],
            "release": [str(damaged_checkpoint), "--output", str(out / "x.safetensors")],
            "eval": ["--weights", str(damaged_checkpoint), "--val-dir", str(tmp_path / "images"), "--results-json",
                     str(out / "x.json")],
            "export": ["--weights", str(damaged_checkpoint), "--output", str(out / "x.onnx")],
            "predict": ["--weights", str(damaged_checkpoint), str(tmp_path / "images"), "--predictions-json",
                        str(out / "x.json")],
            "train": ["--pretrained", str(damaged_checkpoint), "--train-dir", str(tmp_path / "images"),
                      "--save", str(out), "--total-iters", "1"]}[script]
    line = user_error_line(capsys, main, argv)
    assert line == (f"error: {damaged_checkpoint}: its SHA-256 does not match its sidecar, the file is damaged; "
                    "use an earlier checkpoint (a resumed run picks the newest good one by itself)")
    assert not out.exists()


# -- common.average ---------------------------------------------------------------------------------------------

def test_best_zero_names_the_flag(tmp_path, capsys):
    line = user_error_line(capsys, average.main, ["--save-dir", str(tmp_path), "--best", "0", "--output",
                                                 str(tmp_path / "avg.safetensors")])
    assert line == "error: --best 0: must be at least 1"


@pytest.mark.parametrize("flags, expected", [
    (["--average-best", "-1"], "error: --average-best -1: must be 0 (off) or more"),
    # Found only after the whole schedule before: refused at start.
    (["--average-best", "3"], "error: --average-best 3 picks checkpoints by their validation error: give --val-dir "
                              "DIR"),
    (["--recompute-bn", "200", "--val-dir", "VAL"], "error: --recompute-bn 200 re-estimates the statistics of the "
                                                    "--average-best K average: give --average-best K too (for the "
                                                    "trained network itself, --bn-recalibrate N)")])
def test_train_refuses_after_schedule_flags_it_cannot_honour(flags, expected, tmp_path, capsys):
    flags = [str(tmp_path) if flag == "VAL" else flag for flag in flags]
    line = user_error_line(capsys, script_module("OneShot", "train").main,
                          ["--train-dir", str(tmp_path), "--save", str(tmp_path / "run"), *flags])
    assert line == expected


def test_shared_tools_run_as_each_readme_says(tmp_path):
    """A model card's `python -m common...` commands run from its folder; the root README's from the root."""
    commands = []
    for model in MODELS:
        lines = [line for line in (REPO_ROOT / model / "README.md").read_text().splitlines()
                 if "python -m common." in line]
        assert lines, f"{model}/README.md shows no averaging command"
        assert all(line.startswith("PYTHONPATH=.. python -m common.") for line in lines), lines
        commands += [(REPO_ROOT / model, line.split()[3]) for line in lines]
    root_lines = [line for line in (REPO_ROOT / "README.md").read_text().splitlines()
                  if line.startswith("python -m common.")]
    commands += [(REPO_ROOT, line.split()[2]) for line in root_lines]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # One interpreter per place a user stands, each importing every module its README names, as -m would.
    for cwd in {cwd for cwd, _ in commands}:
        modules = sorted({module for place, module in commands if place == cwd})
        extra = {"PYTHONPATH": ".."} if cwd != REPO_ROOT else {}
        result = subprocess.run([sys.executable, "-c", "import importlib, sys; [importlib.import_module(m) "
                                 "for m in sys.argv[1:]]", *modules], cwd=cwd, env={**env, **extra},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (cwd, result.stderr)


# -- MODELS.md --------------------------------------------------------------------------------------------------

CITATION = re.compile(r'MODELS\.md(?:, "([^"]+)")?')


def test_every_models_md_citation_names_a_section_that_exists():
    text = (REPO_ROOT / "MODELS.md").read_text()
    sections = {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}
    cited = []
    for path in [*REPO_ROOT.glob("*/*.py"), *REPO_ROOT.glob("*.md"), *REPO_ROOT.glob("*/*.md"),
                 *REPO_ROOT.glob("tests/*.py")]:
        if path.name == "MODELS.md" or path.name == "test_cli.py":
            continue
        content = path.read_text()
        assert "shared/spec" not in content, f"{path} points outside the repository"
        for match in CITATION.finditer(content):
            cited.append((path.relative_to(REPO_ROOT), match.group(1)))
    assert len(cited) >= 10
    unknown = [(str(path), name) for path, name in cited if name is not None and name not in sections]
    assert not unknown, f"sections of MODELS.md: {sorted(sections)}"


# -- startup ----------------------------------------------------------------------------------------------------

HEAVY = ("coremltools", "onnx", "onnxruntime", "matplotlib", "tensorboard", "torch.utils.tensorboard",
         "torchvision", "timm")


def test_help_imports_no_heavy_library():
    """`--help` of every script (run in one interpreter, one after another) imports none of HEAVY."""
    runs = [(REPO_ROOT / model, [f"{script}.py"]) for model in MODELS for script in ("train", "eval", "export")]
    code = (
        "import os, runpy, sys\n"
        "for folder, script in " + repr([(str(cwd), argv[0]) for cwd, argv in runs]) + ":\n"
        "    os.chdir(folder); sys.argv = [script, '--help']; sys.modules.pop('network', None)\n"
        "    try: runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit: pass\n"
        "os.chdir(" + repr(str(REPO_ROOT)) + "); sys.path.insert(0, os.getcwd())\n"
        "for module in ('common.average', 'common.release'):\n"
        "    sys.argv = [module, '--help']\n"
        "    try: runpy.run_module(module, run_name='__main__')\n"
        "    except SystemExit: pass\n"
        "print('imported:', *sorted(m for m in " + repr(HEAVY) + " if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "imported:"


@pytest.mark.parametrize("model", MODELS)
def test_network_py_has_help_and_checks_its_figures(model):
    """The fifth script of a folder: `--help` explains it (it used to count at once), a plain run prints the counts
    beside the published figures and exits 0 only when both agree."""
    helped = subprocess.run([sys.executable, "network.py", "--help"], cwd=REPO_ROOT / model, capture_output=True,
                            text=True, timeout=600)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: network.py") and "expected" not in helped.stdout
    if model == "OneShot":  # the large ones take a while to build; their figures are tested elsewhere
        counted = subprocess.run([sys.executable, "network.py"], cwd=REPO_ROOT / model, capture_output=True,
                                 text=True, timeout=600)
        assert counted.returncode == 0 and counted.stdout.count(" ok") == 2


@pytest.mark.parametrize("command, expected", [
    (["OneShot/train.py", "--demo", "--bacth-size", "8"], "error: unrecognized arguments: --bacth-size 8"),
    (["ShuffleNetV2.Large/eval.py", "--val-dir", "x"],
     "error: the following arguments are required: --weights/--eval-resume"),
    (["OneShot/export.py", "--weights", "w", "--format", "tflite"],
     "error: --format invalid choice: 'tflite' (choose from 'coreml', 'onnx', 'executorch')"),
    (["OneShot/network.py", "--x"], "error: unrecognized arguments: --x"),
    (["demo.py", "--fast"], "error: unrecognized arguments: --fast"),
    (["OneShot/train.py", "--demo", "--batch-size", "1.5"], "error: --batch-size 1.5: not a whole number; must be at "
                                                            "least 1"),
    (["bench/train_speed.py", "--sizes", "100"], "error: --sizes 100: use a multiple of 32, at least 32, such as "
                                                 "224 (the networks halve the resolution five times; at other sizes "
                                                 "the halvings pad unevenly)")])
def test_a_refused_command_line_is_one_line_in_every_script(command, expected):
    """argparse's own refusals (an unknown flag, a missing one, a bad choice) are one line as the scripts' other
    errors are, not the whole usage first."""
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == expected


@pytest.mark.parametrize("failure", ["full disk", "vanished folder"])
def test_a_file_system_failure_during_the_work_is_one_line_and_exit_status_1(failure, tmp_path, capsys):
    """Outputs are checked at start, but a disk can fill and a folder can be removed during the work."""
    from common.atomic_io import atomic_write_text
    from common.errors import exit_on_user_error

    folder = tmp_path / "results"
    folder.mkdir()

    @exit_on_user_error
    def main() -> int:
        if failure == "full disk":
            with open("/dev/full", "wb", buffering=0) as device:  # every write fails with ENOSPC
                device.write(b"results")
        folder.rmdir()
        atomic_write_text(folder / "results.json", "{}")
        return 0

    if failure == "full disk" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    expected = "No space left on device" if failure == "full disk" else f"{folder}/.results.json."
    assert error.startswith("error: ") and expected in error and len(error.strip().splitlines()) == 1
    assert "the files written before are intact" in error


@pytest.mark.parametrize("writer", ["library", "copytree"])
def test_a_full_disk_in_a_libraries_writer_is_reported_naming_the_output(writer, tmp_path):
    """onnx.save and ExecuTorch raise a full disk's OSError without a file name; coremltools' package save goes
    through shutil.copytree, which keeps only each failure's text. Both name the output the user asked for."""
    from common.atomic_io import failures_named

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "weights.bin").write_bytes(b"w")
    output = tmp_path / "model.mlpackage"
    with pytest.raises(OSError) as failed, failures_named(output):
        if writer == "library":
            full_disk()
        shutil.copytree(tmp_path / "package", tmp_path / ".staging", copy_function=full_disk)
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(output))
    with pytest.raises(shutil.Error, match="already exists"), failures_named(output):  # shutil.move's, a text alone
        raise shutil.Error("Destination path already exists")


@pytest.mark.parametrize("script, flags", [("data_speed", ["--images", "0"]), ("eval_speed", ["--repeats", "0"]),
                                           ("supernet_speed", ["--steps", "0"]),
                                           ("checkpoint_speed", ["--dir", "no-such-folder"]),
                                           ("average_memory", ["--threads", "0"])])
def test_benchmarks_refuse_counts_below_one_and_missing_folders_before_measuring(script, flags):
    result = subprocess.run([sys.executable, f"{script}.py", *flags], cwd=REPO_ROOT / "bench", capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {flags[0]} {flags[1]}: ")
    assert len(result.stderr.strip().splitlines()) == 1


# The benchmarks share timing.add_results_argument (two of them here: average_memory imports differently); run.py
# checks its results file itself.
@pytest.mark.parametrize("script", ["average_memory", "data_speed", "run"])
def test_benchmarks_refuse_an_unwritable_results_file_before_measuring(script, tmp_path):
    blocking = tmp_path / "a-file"
    blocking.write_text("")
    results = blocking / "results.json"
    result = subprocess.run([sys.executable, f"{script}.py", "--results-json", str(results)], cwd=REPO_ROOT / "bench",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert str(results) in last and f"{blocking} is a file, not a folder" in last and "=== " not in result.stdout


@pytest.mark.parametrize("content, expected", [(None, "no such file"), ("x,y\n", "cannot read it as JSON"),
                                               ("{}", "not a results file of bench/run.py")])
def test_benchmark_summary_of_a_missing_or_other_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    result = subprocess.run([sys.executable, "run.py", "--summary", str(path)], cwd=REPO_ROOT / "bench",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"error: --summary {path}: {expected}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_output_piped_into_a_reader_that_left_ends_quietly(tmp_path):
    """`python bench/run.py --summary FILE | head -1`: no BrokenPipeError traceback, the status a shell gives."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine": {"bf16_native": False, "threads": 2, "matmul_gflops": 100.0, "torch": "2"},
                                "quick": True, "sections": {}}))
    child = subprocess.Popen([sys.executable, "run.py", "--summary", str(path)], cwd=REPO_ROOT / "bench",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # the reader leaves before the first line is written
    error = child.stderr.read()
    assert child.wait(timeout=120) == 141 and error == ""
