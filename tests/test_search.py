"""Single Path One-Shot: search space, supernet, train_supernet.py, search.py and retraining, through the scripts."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint_store import get_latest_model
from common.counting import count_macs, count_parameters
from common.data import scan_image_folder
from common.errors import UserError
from common.model_state import load_model_state, read_weights_file
from common.models import create_network_for
from common.release import write_release
from conftest import REPO_ROOT, network

ONESHOT = REPO_ROOT / "OneShot"
sys.path.insert(0, str(ONESHOT))
import search  # noqa: E402
import search_space  # noqa: E402
import supernet  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SUPERNET = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--deterministic", "--display-interval", "1",
            "--val-interval", "1000", "--learning-rate", "0.05", "--held-out-per-class", "2", "--total-iters", "4",
            "--save-interval", "2"]
SEARCH = ["--population", "4", "--top-k", "2", "--mutations", "1", "--crossovers", "1", "--generations", "3",
          "--bn-images", "8", "--bn-batch-size", "4", "--batch-size", "3", "--workers", "0", "--flops-max", "330e6"]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=ONESHOT, capture_output=True, text=True, timeout=600,
                          env=ENV, **kwargs)


def run_killed(command: list[str], marker: str) -> None:
    """Start `command` and SIGKILL it as soon as it prints a line containing `marker`."""
    process = subprocess.Popen([sys.executable, *command], cwd=ONESHOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if marker in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait()


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return read_weights_file(path)["model"]


@pytest.fixture(scope="module")
def supernet_run(tmp_path_factory, image_folder) -> Path:
    """A supernet trained straight through 4 iterations on the 3-class folder."""
    save = tmp_path_factory.mktemp("supernet")
    result = run(["train_supernet.py", "--train-dir", str(image_folder), "--save", str(save), *SUPERNET])
    assert result.returncode == 0, result.stderr
    return save


def randomise_batchnorm(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(module.bias.shape, generator=generator))


def test_released_architecture_through_the_builder_equals_todays_network():
    module = network("OneShot")
    torch.manual_seed(0)
    today = module.create_network()
    torch.manual_seed(0)
    built = module.create_network(architecture=json.loads(json.dumps(module.released_architecture())))
    a, b = today.state_dict(), built.state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(today.eval()(x), built.eval()(x))
    with pytest.raises(ValueError, match="channel_scales"):
        module.create_network(architecture={"blocks": [0] * 20, "channel_scales": [0.3] * 20})
    assert module.create_network_for({"num_classes": 6}).classifier[0].out_features == 6


def test_path_weights_in_a_standalone_network_give_the_supernets_outputs():
    torch.manual_seed(0)
    model = supernet.create_network(5)
    randomise_batchnorm(model)
    x = torch.randn(2, 3, 32, 32) * 50
    for iteration in range(2):
        path = search_space.path_for_iteration(7, iteration, 100e6, 500e6, 5)
        model.set_architecture(path)
        standalone = network("OneShot").create_network(5, search_space.to_json(path, 5))
        standalone.load_state_dict(supernet.path_state_dict(model, path))
        assert torch.allclose(model.eval()(x), standalone.eval()(x), rtol=1e-5, atol=1e-6)


def test_parameters_outside_the_path_get_no_gradient():
    torch.manual_seed(0)
    model = supernet.create_network(5)
    path = search_space.path_for_iteration(0, 0, 100e6, 500e6, 5)
    model.set_architecture(path)
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    for layer, block in enumerate(path[0]):
        for choice, candidate in enumerate(model.features[layer].choices):
            grads = [p.grad is not None for p in candidate.parameters()]
            assert all(grads) if choice == block else not any(grads)
    assert model.first_conv[1].weight is None and model.conv_last[1].weight is None  # affine=False


@pytest.mark.parametrize("num_classes,low,high", [(1000, 290e6, 360e6), (6, 100e6, 200e6), (6, 500e6, 900e6)])
def test_flops_of_sampled_paths_equal_the_counters_on_the_standalone_network(num_classes, low, high):
    for iteration in range(3):
        path = search_space.path_for_iteration(0, iteration, low, high, num_classes)
        macs, params = search_space.costs(path, num_classes)
        assert low <= macs <= high
        with torch.device("meta"):
            standalone = network("OneShot").create_network(num_classes, search_space.to_json(path, num_classes))
        assert count_macs(standalone) == macs and count_parameters(standalone) == params
    released = search_space.from_json(network("OneShot").released_architecture())
    assert search_space.costs(released) == (327_857_920, 3_432_579)


def test_the_path_of_an_iteration_depends_on_seed_and_iteration_only():
    code = ("import sys; sys.path.insert(0, 'OneShot'); import search_space; "
            "print([search_space.path_for_iteration(3, i, 290e6, 360e6) for i in range(5)])")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                           env={**ENV, "PYTHONHASHSEED": "12345"}).stdout
    assert other.strip() == str([search_space.path_for_iteration(3, i, 290e6, 360e6) for i in range(5)])
    assert len({search_space.path_for_iteration(3, i, 290e6, 360e6) for i in range(5)}) == 5


def test_supernet_run_killed_and_resumed_is_bit_identical(tmp_path, image_folder, supernet_run):
    command = ["train_supernet.py", "--train-dir", str(image_folder), "--save", str(tmp_path), *SUPERNET]
    run_killed(command, "0000000002")
    assert get_latest_model(tmp_path)[1] == 2, "the kill must land between the checkpoints at 2 and 4"
    result = run(command)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    a, b = state_of(get_latest_model(supernet_run)[0]), state_of(get_latest_model(tmp_path)[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_supernet_trains_on_the_training_part_only(image_folder):
    samples, _ = scan_image_folder(image_folder)
    held_out = search_space.held_out_split(samples, 2, seed=0)
    assert len(held_out) == 6 and held_out == search_space.held_out_split(samples, 2, seed=0)
    assert sorted({samples[i][1] for i in held_out}) == [0, 1, 2]
    import train_supernet
    kept = train_supernet.RECIPE.hooks.train_samples(samples, argparse.Namespace(held_out_per_class=2, seed=0))
    assert len(kept) == len(samples) - 6 and not {samples[i] for i in held_out} & set(kept)


def test_held_out_split_is_disjoint_from_bn_images_and_the_val_folder(image_folder, tmp_path):
    from common.demo_data import make_image_folder
    val = make_image_folder(tmp_path / "val", num_classes=3, images_per_class=4, size=48, seed=5)
    samples, _ = scan_image_folder(image_folder)
    held_out = search_space.held_out_split(samples, 2, seed=0)
    bn, scored = search.split_images(samples, held_out, bn_images=100, score_images=100, seed=0)
    assert len(bn) == len(samples) - len(held_out) and not set(bn) & set(held_out)
    assert sorted(scored) == held_out
    val_paths = {path for path, _ in scan_image_folder(val)[0]}
    assert all(Path(samples[i][0]).is_relative_to(image_folder) for i in scored)
    assert not {samples[i][0] for i in scored} & val_paths


def test_candidates_respect_the_budget_and_are_new():
    args = search.build_parser().parse_args(["--flops-max", "250e6", "--flops-min", "200e6", "--population", "20",
                                             "--top-k", "5", "--mutations", "8", "--crossovers", "8"])
    scores: dict[str, float] = {}
    for generation in range(3):
        population = search.next_population(generation, scores, args, 1000)
        keys = [search.key_of(c) for c in population]
        assert len(population) == 20 and len(set(keys)) == 20 and not set(keys) & set(scores)
        assert all(200e6 <= search_space.costs(c)[0] <= 250e6 for c in population)
        scores.update({k: float(np.random.default_rng(len(scores) + i).random()) for i, k in enumerate(keys)})


@pytest.fixture(scope="module")
def straight_search(tmp_path_factory, supernet_run) -> Path:
    """search.py's output of an uninterrupted 3-generation search of `supernet_run`."""
    output = tmp_path_factory.mktemp("search") / "straight.json"
    result = run(["search.py", "--supernet", str(get_latest_model(supernet_run)[0]), "--output", str(output),
                  *SEARCH])
    assert result.returncode == 0, result.stderr
    assert "candidates/s" in result.stdout and "ETA" in result.stdout
    return output


@pytest.mark.slow
def test_search_killed_between_generations_resumes_to_the_same_result(tmp_path, supernet_run, straight_search):
    checkpoint = str(get_latest_model(supernet_run)[0])
    straight, killed = straight_search, tmp_path / "killed.json"
    run_killed(["search.py", "--supernet", checkpoint, "--output", str(killed), *SEARCH], "generation 1/3")
    state = json.loads(killed.with_name("killed.json.state.json").read_text())
    assert 1 <= state["generation"] < 3 and not killed.exists()
    result = run(["search.py", "--supernet", checkpoint, "--output", str(killed), *SEARCH])
    assert result.returncode == 0, result.stderr
    a, b = json.loads(straight.read_text()), json.loads(killed.read_text())
    assert a["architectures"] == b["architectures"]
    assert a["search"]["candidates_evaluated"] == 12
    assert all(arch["macs"] <= 330e6 and 0 <= arch["held_out_top1"] <= 100 for arch in a["architectures"])
    assert a["search"]["held_out"]["images"] == 6
    assert straight.with_suffix(".png").stat().st_size > 1000


def test_more_generations_continue_a_search_and_other_settings_are_named(tmp_path, supernet_run, straight_search):
    checkpoint = str(get_latest_model(supernet_run)[0])
    output = tmp_path / "search.json"
    fewer = [*SEARCH[:SEARCH.index("--generations")], "--generations", "1", *SEARCH[SEARCH.index("--generations") + 2:]]
    assert run(["search.py", "--supernet", checkpoint, "--output", str(output), *fewer]).returncode == 0
    result = run(["search.py", "--supernet", checkpoint, "--output", str(output), *SEARCH])
    assert result.returncode == 0, result.stderr
    assert f"resuming the search saved in {output}.state.json after generation 1" in result.stdout
    assert json.loads(output.read_text())["architectures"] == json.loads(straight_search.read_text())["architectures"]
    state = output.with_name("search.json.state.json")
    for damaged in ('{"generation": 3', "[]", '{"generation": 3}'):
        state.write_text(damaged)
        refused = run(["search.py", "--supernet", checkpoint, "--output", str(output), *SEARCH])
        assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
        assert f"{state}: not the state of a search this script saved" in refused.stderr
    state.unlink()
    assert run(["search.py", "--supernet", checkpoint, "--output", str(output), *fewer]).returncode == 0
    other = run(["search.py", "--supernet", checkpoint, "--output", str(output), *SEARCH, "--population", "5"])
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0
    assert "a search with other settings (--population 4 there, 5 here)" in other.stderr


def test_a_second_search_on_the_same_output_is_refused_while_the_first_runs(tmp_path, supernet_run):
    checkpoint = str(get_latest_model(supernet_run)[0])
    output = tmp_path / "search.json"
    command = ["search.py", "--supernet", checkpoint, "--output", str(output), *SEARCH]
    endless = [*command, "--generations", "100000"]  # the last --generations wins
    first = subprocess.Popen([sys.executable, *endless], cwd=ONESHOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if "generation 1/" in line:
                break
        second = run(command)
        assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr
        assert (f"--output {output}: another search is writing its state there (process {first.pid} on "
                in second.stderr)
    finally:
        first.kill()
        first.communicate(timeout=120)
    # The lock goes with the process: the same command now goes on from the state the first one saved.
    again = run(command)
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_random_search_then_retrain_and_evaluate_the_found_architecture(tmp_path, supernet_run, image_folder):
    checkpoint = str(get_latest_model(supernet_run)[0])
    random = tmp_path / "random.json"
    result = run(["search.py", "--supernet", checkpoint, "--output", str(random), "--random", *SEARCH])
    assert result.returncode == 0, result.stderr
    assert json.loads(random.read_text())["search"]["candidates_evaluated"] == 12
    found = json.loads(random.read_text())["architectures"][0]

    # Retraining the found architecture: its checkpoints carry it, and eval.py builds the network from them.
    save = tmp_path / "retrain"
    result = run(["train.py", "--train-dir", str(image_folder), "--architecture", str(random), "--save", str(save),
                  "--image-size", "32", "--batch-size", "8", "--workers", "0", "--total-iters", "1"])
    assert result.returncode == 0, result.stderr
    checkpoint, _ = get_latest_model(save)
    metadata = read_weights_file(checkpoint)["metadata"]
    assert metadata["architecture"] == {k: found[k] for k in ("blocks", "channel_scales")}
    result = run(["eval.py", "--weights", str(checkpoint), "--val-dir", str(image_folder), "--workers", "0",
                  "--results-json", str(tmp_path / "eval.json")])
    assert result.returncode == 0, result.stderr
    with torch.device("meta"):
        standalone = network("OneShot").create_network(3, found)
    assert json.loads((tmp_path / "eval.json").read_text())["macs"] == count_macs(standalone, 32)

    # torch.hub and timm build the found architecture from the checkpoint, with its classes, and agree with it.
    import timm

    import common.timm_models  # noqa: F401  (registers the models with timm)
    from common.pretrained import create_model
    trained = create_network_for(network("OneShot"), 3, metadata).eval()
    load_model_state(trained, checkpoint)
    hub = create_model("oneshot", checkpoint)
    registered = timm.create_model("oneshot", pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)})
    images = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        expected = trained(images)
        assert torch.equal(hub(images), expected)
        assert torch.allclose(registered.eval()(images.flip(1)), expected, atol=1e-5)

    # Resumed without naming it, the run keeps its architecture; with another --architecture it is refused in one
    # line, not with a list of mismatched tensors.
    released = tmp_path / "released.json"
    released.write_text(json.dumps(network("OneShot").released_architecture()))
    resume = ["train.py", "--train-dir", str(image_folder), "--save", str(save), "--image-size", "32",
              "--batch-size", "8", "--workers", "0", "--total-iters", "2"]
    result = run([*resume, "--architecture", str(released)])
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert f"another searched architecture (--architecture {random})" in result.stderr
    assert f"--architecture {released}" in result.stderr and get_latest_model(save)[1] == 1
    result = run(resume)
    assert result.returncode == 0, result.stderr
    checkpoint = get_latest_model(save)[0]
    assert read_weights_file(checkpoint)["metadata"]["architecture"] == metadata["architecture"]

    # Fine-tuning from it trains the same architecture without naming it again.
    tuned = tmp_path / "tuned"
    result = run(["train.py", "--train-dir", str(image_folder), "--pretrained", str(checkpoint), "--save", str(tuned),
                  "--image-size", "32", "--batch-size", "8", "--workers", "0", "--total-iters", "1"])
    assert result.returncode == 0, result.stderr
    assert "fine-tunes the searched architecture the file holds" in result.stdout
    assert read_weights_file(get_latest_model(tuned)[0])["metadata"]["architecture"] == metadata["architecture"]


def test_bad_architecture_file_is_a_one_line_error(tmp_path, image_folder):
    bad = tmp_path / "arch.json"
    bad.write_text(json.dumps({"blocks": [5] * 20, "channel_scales": [1.0] * 20}))
    result = run(["train.py", "--train-dir", str(image_folder), "--architecture", str(bad), "--save",
                  str(tmp_path / "x")])
    assert result.returncode != 0 and "Traceback" not in result.stderr and "--architecture" in result.stderr
    assert not (tmp_path / "x").exists()


def test_holding_out_more_than_a_class_has_is_one_line_before_any_work(tmp_path, image_folder):
    samples, classes = scan_image_folder(image_folder)
    smallest = min(classes, key=lambda name: sum(classes[label] == name for _, label in samples))
    count = sum(classes[label] == smallest for _, label in samples)
    result = run(["train_supernet.py", "--train-dir", str(image_folder), "--save", str(tmp_path / "x"), *SUPERNET,
                  "--held-out-per-class", str(count)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: --held-out-per-class {count}: class {smallest} has only {count} training images" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("budget", ["nan", "-1", "33x0M"])
def test_a_budget_that_is_not_a_number_is_refused_when_parsed_before_any_work(tmp_path, image_folder, budget):
    result = run(["train_supernet.py", "--train-dir", str(image_folder), "--save", str(tmp_path / "x"), *SUPERNET,
                  "--flops-max", budget])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --flops-max {budget}: give a number of multiply-accumulates, 0 or more, "
                                     "such as 330e6 or 330M")
    assert not (tmp_path / "x").exists()


def test_a_budget_without_its_unit_is_refused_with_the_unit_to_add(tmp_path, image_folder):
    result = run(["train_supernet.py", "--train-dir", str(image_folder), "--save", str(tmp_path / "x"), *SUPERNET,
                  "--flops-max", "330"])
    assert result.returncode == 2 and not (tmp_path / "x").exists()
    assert result.stderr.strip() == ("error: --flops-max 330: 330 multiply-accumulates, fewer than any network here; "
                                     "give millions with M, such as 330M")


def test_a_budget_reads_as_the_scripts_print_it():
    args = search.build_parser().parse_args(["--flops-max", "330M", "--flops-min", "0.1G"])
    assert (args.flops_max, args.flops_min) == (330e6, 100e6)
    assert search.build_parser().parse_args([]).flops_max == 330e6


def test_search_into_a_new_folder_creates_it_and_an_unwritable_output_fails_before_any_work(
        tmp_path, supernet_run):
    checkpoint = str(get_latest_model(supernet_run)[0])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run(["search.py", "--supernet", checkpoint, "--output", str(blocker / "search.json"), *SEARCH])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--output {blocker / 'search.json'}: cannot write there ({blocker} is a file" in result.stderr
    assert "generation" not in result.stdout
    output = tmp_path / "new" / "folder" / "search.json"
    result = run(["search.py", "--supernet", checkpoint, "--output", str(output), *SEARCH, "--generations", "1"])
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text())["architectures"]
    # A checkpoint of another kind is refused before the output's folder is made.
    other = tmp_path / "other" / "search.json"
    result = run(["search.py", "--supernet", str(get_latest_model(supernet_run)[0].with_suffix(".json")), "--output",
                  str(other), *SEARCH])
    assert result.returncode == 2 and "Traceback" not in result.stderr and not other.parent.exists()


def test_the_weights_of_one_network_given_as_supernet_are_named_as_such(tmp_path):
    path = tmp_path / "oneshot.safetensors"
    write_release(path, network("OneShot").create_network(num_classes=3).state_dict(),
                  {"arch": "OneShot", "num_classes": 3})
    result = run(["search.py", "--supernet", str(path), "--output", str(tmp_path / "s.json"), *SEARCH])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --supernet {path}: not a checkpoint of train_supernet.py but the weights "
                                     "of one OneShot network; give one from train_supernet.py's --save folder")


def test_demo_with_other_flags_is_refused_before_any_work():
    result = run(["search.py", "--demo", "--supernet", "x.pth", "--generations", "3"])
    assert result.returncode == 2
    assert "--demo runs the three stages with settings of its own; leave out --supernet, --generations" in \
        result.stderr
    assert "===" not in result.stdout


def test_demo_under_torchrun_is_refused_on_every_rank():
    from test_train import free_port

    result = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                  "search.py", "--demo"])
    # torchrun prints a traceback of its own when its processes fail; none may come from search.py.
    assert result.returncode != 0 and "search.py\", line" not in result.stderr
    assert result.stderr.count("error: --demo starts its stages as processes of its own: run it with python, not "
                               "torchrun") == 2
    assert "===" not in result.stdout


@pytest.mark.slow
def test_supernet_trains_under_two_gloo_ranks(tmp_path, image_folder):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "train_supernet.py", "--train-dir", str(image_folder), "--save", str(tmp_path), *SUPERNET,
         "--device", "cpu", "--channels-last"], cwd=ONESHOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr
    assert get_latest_model(tmp_path)[1] == 4
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.slow
def test_search_under_two_gloo_ranks_finds_what_one_process_finds(tmp_path, supernet_run, straight_search):
    output = tmp_path / "two.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "search.py",
         "--supernet", str(get_latest_model(supernet_run)[0]), "--output", str(output), *SEARCH, "--device", "cpu"],
        cwd=ONESHOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text())["architectures"] == json.loads(straight_search.read_text())["architectures"]


def test_train_supernet_has_no_flags_for_one_network():
    import train_supernet

    from common.training import build_parser
    parser = build_parser(train_supernet.RECIPE)
    for flags in (["--pretrained", "x.pth"], ["--freeze-backbone"], ["--eval"], ["--eval-resume", "x.pth"]):
        with pytest.raises(UserError, match=f"unrecognized arguments: {flags[0]}"):
            parser.parse_args(["--demo", *flags])
    assert not any(word in parser.format_help() for word in ("--pretrained", "--eval", "--freeze-backbone"))
    assert "--pretrained" in build_parser(network("OneShot").RECIPE).format_help()


def test_a_released_supernet_is_searched_with_its_training_folder_named(tmp_path, supernet_run, image_folder):
    released = tmp_path / "supernet.safetensors"
    result = subprocess.run([sys.executable, "-m", "common.release", str(get_latest_model(supernet_run)[0]),
                             "--output", str(released)], cwd=REPO_ROOT, capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    # Named by its metadata, not as tensors that fit no model folder.
    assert result.stdout.splitlines()[0].endswith(", a OneShot-supernet state dict"), result.stdout
    output = tmp_path / "search.json"
    result = run(["search.py", "--supernet", str(released), "--output", str(output), *SEARCH])
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "give --train-dir DIR" in result.stderr and not output.exists()
    result = run(["search.py", "--supernet", str(released), "--train-dir", str(image_folder), "--output", str(output),
                  *SEARCH])
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text())["architectures"]
