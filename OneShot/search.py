"""Search a trained OneShot supernet for the best architecture under a FLOPs budget (stage 2 of 3).

Evolutionary search as in Single Path One-Shot: a population of 50, the top 10 kept, every generation 25 mutations
(each layer re-drawn with probability 0.1) and 25 crossovers of top candidates, topped up with random ones, 20
generations; no candidate above --flops-max (multiply-accumulates at 224x224) and none evaluated twice. Each
candidate's BatchNorm statistics are re-estimated on --bn-images training images, then it is scored (top-1) on the
supernet run's held-out training images, never on a validation folder. `--random` evaluates as many uniformly drawn
candidates instead (the paper's baseline). Under torchrun the candidates of a generation are split over the ranks.
The state is saved after every generation; the same command resumes.

    python search.py --supernet supernet/checkpoint-0000150000.pth --flops-max 330e6 --output search.json
    torchrun --nproc_per_node 8 search.py --supernet ... --flops-max 330e6 --output search.json
    python search.py --demo      # supernet, search, random search and retraining on the built-in data
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import network  # noqa: E402
import search_space  # noqa: E402
import supernet as supernet_module  # noqa: E402
from common.bn_recalibrate import recalibrate_batchnorm  # noqa: E402
from common.atomic_io import atomic_write, claim_output  # noqa: E402
from common.cli import (ArgumentParser, add_device_argument, fraction, multiple_of_32, mac_count,  # noqa: E402
                        positive_int, prepare_output, run_script, seed_value, worker_count, zero_or_more)
from common.data import (EvalTransform, ImageDataset, TrainTransform, collate_skip_corrupt,  # noqa: E402
                         evaluation_order, scan_image_folder)
from common.distributed import (all_gather_objects, checked_on_main, init_distributed,  # noqa: E402
                                launched_world_size, shutdown_distributed)
from common.errors import UserError, exit_on_user_error  # noqa: E402
from common.input_format import InputFormat, Preprocess  # noqa: E402
from common.model_state import load_model_state, read_checkpoint_metadata  # noqa: E402
from common.training import format_duration  # noqa: E402

Choices = search_space.Choices


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernet", help="checkpoint of train_supernet.py")
    parser.add_argument("--train-dir", help="the supernet's training folder (default: the one its checkpoint records; "
                                            "needed for a released or averaged supernet, which records none)")
    parser.add_argument("--flops-max", type=mac_count, default="330M",
                        help="largest multiply-accumulates of a candidate, counted at 224x224, as 330e6 or 330M")
    parser.add_argument("--flops-min", type=mac_count, default="0", help="smallest multiply-accumulates of a candidate")
    parser.add_argument("--output", default="search.json",
                        help="result JSON; the resumable state goes beside it (<output>.state.json), and the "
                             "plot (<output stem>.png)")
    parser.add_argument("--random", action="store_true",
                        help="random search: every generation draws --population new random candidates")
    evolution = parser.add_argument_group("evolution (defaults: the original)")
    evolution.add_argument("--population", type=positive_int, default=50, help="candidates per generation")
    evolution.add_argument("--top-k", type=positive_int, default=10, help="best candidates kept as parents")
    evolution.add_argument("--mutations", type=zero_or_more, default=25, help="mutated candidates per generation")
    evolution.add_argument("--mutation-prob", type=fraction, default=0.1, help="probability a layer is re-drawn")
    evolution.add_argument("--crossovers", type=zero_or_more, default=25, help="crossed-over candidates per generation")
    evolution.add_argument("--generations", type=positive_int, default=20, help="number of generations")
    evolution.add_argument("--seed", type=seed_value, default=0, help="seed of the search and of the BN images")
    scoring = parser.add_argument_group("scoring a candidate")
    scoring.add_argument("--bn-images", type=positive_int, default=20_000,
                         help="training images (outside the held-out split) to re-estimate BatchNorm statistics")
    scoring.add_argument("--bn-batch-size", type=positive_int, default=128, help="batch of BatchNorm re-estimation")
    scoring.add_argument("--score-images", type=positive_int, default=10_000,
                         help="held-out images a candidate is scored on (all when fewer are held out)")
    scoring.add_argument("--batch-size", type=positive_int, default=200, help="scoring batch size")
    scoring.add_argument("--image-size", type=multiple_of_32, help="image size (default: the supernet's training size)")
    scoring.add_argument("--workers", type=worker_count, default=min(8, os.cpu_count() or 1),
                         help="data-loading worker processes; the images are decoded once and kept in memory "
                              "(default: the CPU count, at most 8)")
    add_device_argument(scoring)
    parser.add_argument("--demo", action="store_true",
                        help="run the three stages on the built-in data at small size: train a supernet, search "
                             "it (evolution and random), retrain the found architecture; results in runs/search-demo, "
                             "and run again, it resumes where it stopped")
    return parser


# -- the evolutionary search, a pure function of the seed, the generation and the scores -------------------

def key_of(choices: Choices) -> str:
    return ",".join(map(str, choices[0])) + "|" + ",".join(map(str, choices[1]))


def from_key(key: str) -> Choices:
    blocks, scales = key.split("|")
    return tuple(map(int, blocks.split(","))), tuple(map(int, scales.split(",")))


def within(choices: Choices, args: argparse.Namespace, num_classes: int) -> bool:
    return args.flops_min <= search_space.costs(choices, num_classes)[0] <= args.flops_max


def next_population(generation: int, scores: dict[str, float], args: argparse.Namespace,
                    num_classes: int) -> list[Choices]:
    """The candidates generation `generation` evaluates: all new (none scored before), all within budget."""
    rng = np.random.default_rng([args.seed, generation, 0x5EA])
    seen = set(scores)
    new: list[Choices] = []

    def take(candidate: Choices) -> bool:
        if key_of(candidate) in seen or not within(candidate, args, num_classes):
            return False
        seen.add(key_of(candidate))
        new.append(candidate)
        return True

    if generation > 0 and not args.random:
        parents = [from_key(k) for k in sorted(scores, key=lambda k: (-scores[k], k))[:args.top_k]]
        layers = search_space.NUM_LAYERS
        for kind, count in (("mutation", args.mutations), ("crossover", args.crossovers)):
            goal = len(new) + count
            for _ in range(10 * count):  # bounded: a tight budget may reject most offspring
                if len(new) >= goal:
                    break
                if kind == "mutation":
                    parent = parents[rng.integers(len(parents))]
                    redraw = rng.random(layers) < args.mutation_prob
                    blocks = np.where(redraw, rng.integers(0, network.NUM_BLOCK_CHOICES, layers), parent[0])
                    scales = np.where(redraw, rng.integers(0, search_space.NUM_SCALES, layers), parent[1])
                else:
                    first, second = (parents[i] for i in rng.integers(len(parents), size=2))
                    pick = rng.random(layers) < 0.5
                    blocks = np.where(pick, first[0], second[0])
                    scales = np.where(pick, first[1], second[1])
                take((tuple(int(b) for b in blocks), tuple(int(s) for s in scales)))
    while len(new) < args.population:
        take(search_space.sample(rng, args.flops_min, args.flops_max, num_classes))
    return new


# -- data: the held-out split and the BN images, decoded once --------------------------------------------------

def held_out_record(samples: list[tuple[str, int]], held_out: list[int], train_dir: Path, per_class: int,
                    seed: int) -> dict:
    names = "\n".join(os.path.relpath(samples[i][0], train_dir) for i in held_out)
    return {"train_dir": str(train_dir), "per_class": per_class, "seed": seed, "images": len(held_out),
            "sha256": hashlib.sha256(names.encode()).hexdigest()}


def split_images(samples: list[tuple[str, int]], held_out: list[int], bn_images: int, score_images: int,
                 seed: int) -> tuple[list[int], list[int]]:
    """(BN re-estimation indices, scoring indices): the first from outside the held-out split, drawn from the seed;
    the second the first `score_images` held-out images in the class-interleaved evaluation order."""
    held = set(held_out)
    rest = np.array([i for i in range(len(samples)) if i not in held])
    bn = rest[np.random.default_rng([seed, 0xB17]).permutation(len(rest))[:bn_images]].tolist()
    order = evaluation_order([samples[i][1] for i in held_out])[:score_images]
    return bn, [held_out[i] for i in order]


def decode_batches(dataset: ImageDataset, batches: list[list], workers: int, crop_size: int) -> list:
    collate = functools.partial(collate_skip_corrupt, image_shape=(3, crop_size, crop_size))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate)
    return [(images, labels) for images, labels, _ in loader]


class Scorer:
    """Re-estimates a candidate's BatchNorm statistics and measures its held-out top-1 on cached images."""

    def __init__(self, model: supernet_module.Supernet, preprocess: Preprocess, bn_batches: list,
                 score_batches: list, device: torch.device) -> None:
        self.model, self.preprocess, self.device = model, preprocess, device
        self.bn_batches, self.score_batches = bn_batches, score_batches

    @torch.no_grad()
    def __call__(self, choices: Choices) -> float:
        self.model.set_architecture(choices)
        inputs = (self.preprocess(images.to(self.device)) for images, _ in self.bn_batches)
        recalibrate_batchnorm(self.model, inputs, len(self.bn_batches))
        self.model.eval()
        correct = total = 0
        for images, labels in self.score_batches:
            logits = self.model(self.preprocess(images.to(self.device)))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            total += labels.numel()
        return 100.0 * correct / max(1, total)


# -- state, result and plot --------------------------------------------------------------------------------------

def write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=1).encode()
    atomic_write(path, lambda file: file.write(text))


def result(state: dict, num_classes: int, top: int = 10) -> dict:
    scores = state["scores"]
    best = sorted(scores, key=lambda k: (-scores[k], k))[:top]
    return {"architectures": [search_space.to_json(from_key(k), num_classes, held_out_top1=scores[k])
                              for k in best],
            "search": {key: state[key] for key in ("method", "settings", "held_out", "generation")}
            | {"candidates_evaluated": len(scores)}}


def plot(state: dict, path: Path, num_classes: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.viridis(np.linspace(0, 1, max(1, len(state["populations"]))))
    for generation, (keys, colour) in enumerate(zip(state["populations"], colours)):
        macs = [search_space.costs(from_key(k), num_classes)[0] / 1e6 for k in keys]
        axes.scatter(macs, [state["scores"][k] for k in keys], s=10, color=colour, label=f"gen {generation}")
    axes.axvline(state["settings"]["flops_max"] / 1e6, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("MFLOPs (multiply-accumulates at 224x224)")
    axes.set_ylabel("held-out top-1 accuracy (%)")
    axes.set_title(f"OneShot {state['method']} search: population per generation")
    if len(state["populations"]) <= 20:
        axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120)
    plt.close(figure)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))


# -- main ----------------------------------------------------------------------------------------------------------

def check_args(args: argparse.Namespace) -> None:
    if args.mutations + args.crossovers > args.population:
        raise UserError(f"--mutations + --crossovers ({args.mutations + args.crossovers}) exceed --population "
                        f"{args.population}")
    if not args.supernet:
        raise UserError("--supernet CHECKPOINT is required (a checkpoint of train_supernet.py), or --demo")
    if not Path(args.supernet).is_file():
        raise UserError(f"--supernet {args.supernet}: no such file")


def supernet_and_its_images(args: argparse.Namespace) -> tuple[dict, Path, list[tuple[str, int]]]:
    """(metadata, training folder, its samples) of --supernet, checked."""
    metadata = read_checkpoint_metadata(args.supernet)
    if metadata.get("arch") != "OneShot-supernet" or not metadata.get("supernet"):
        what = f" but the weights of one {metadata['arch']} network" if metadata.get("arch") else ""
        raise UserError(f"--supernet {args.supernet}: not a checkpoint of train_supernet.py{what}; give one from "
                        "train_supernet.py's --save folder")
    train_dir = args.train_dir or metadata.get("args", {}).get("train_dir")
    if train_dir is None:  # a release or an average leaves out the local paths of its training
        raise UserError(f"--supernet {args.supernet} does not record the folder it was trained on: give --train-dir "
                        "DIR, its training folder (the held-out images are drawn from it as in training)")
    train_dir = Path(train_dir)
    samples, classes = scan_image_folder(train_dir, "--train-dir")
    if classes != metadata["classes"]:
        raise UserError(f"--train-dir {train_dir}: its classes differ from those the supernet was trained on")
    return metadata, train_dir, samples


def search(args: argparse.Namespace) -> dict:
    check_args(args)
    metadata, train_dir, samples = supernet_and_its_images(args)
    trained, num_classes = metadata["supernet"], metadata["num_classes"]
    search_space.check_budget(args.flops_min, args.flops_max, num_classes)
    if args.flops_max < trained["flops_min"] or args.flops_min > trained["flops_max"]:
        print(f"warning: the supernet trained paths of {trained['flops_min'] / 1e6:g}M-"
              f"{trained['flops_max'] / 1e6:g}M FLOPs only; every candidate here lies outside that range",
              file=sys.stderr)
    held_out = search_space.held_out_split(samples, trained["held_out_per_class"], trained["seed"])
    held = held_out_record(samples, held_out, train_dir, trained["held_out_per_class"], trained["seed"])
    bn_indices, score_indices = split_images(samples, held_out, args.bn_images, args.score_images, args.seed)
    image_size = args.image_size or metadata["image_size"]
    settings = {name: getattr(args, name) for name in _FLAG_SETTINGS[:-2]} | {
        "image_size": image_size, "supernet": str(Path(args.supernet).resolve()),
        "bn_images_used": len(bn_indices), "score_images_used": len(score_indices)}
    method = "random" if args.random else "evolution"

    # The state is written after the first generation: a folder that cannot take it must fail now (and only now
    # that the inputs are known good, so that a mistyped command leaves no folder behind).
    output = prepare_output("--output", args.output)
    state_path = output.with_name(output.name + ".state.json")
    for beside in (state_path, output.with_suffix(".png")):  # written beside it: a folder there fails now too
        prepare_output("--output", beside)
    fresh = {"method": method, "settings": settings, "held_out": held, "generation": 0, "scores": {},
             "populations": [], "seconds": 0.0}
    info = init_distributed(args.device)
    say = print if info.is_main else (lambda *a, **k: None)
    try:
        # Two runs on one --output would write one state file in turn; rank 0 writes it, so it claims it.
        checked_on_main(lambda: claim_output(output.with_name(f".{output.name}.lock"), lambda holder: (
            f"--output {output}: another search is writing its state there{holder}; wait for it to end or choose "
            "another --output")), info)
        state = _resumed_state(state_path, fresh, args.generations)
        if state["generation"] < args.generations:
            if state["generation"]:
                say(f"resuming the search saved in {state_path} after generation {state['generation']}")
            _evolve(args, state, state_path, info, say, samples, bn_indices, score_indices, image_size,
                    num_classes, metadata)
        else:
            say(f"{state_path}: the search already ran {state['generation']} generations (--generations "
                f"{args.generations})")
    finally:
        shutdown_distributed()
    final = result(state, num_classes)
    if info.is_main:
        _write_results(output, final, state, num_classes, method)
    return final


def _write_results(output: Path, final: dict, state: dict, num_classes: int, method: str) -> None:
    write_json(output, final)
    plot(state, output.with_suffix(".png"), num_classes)
    best = final["architectures"][0]
    print(f"best of {len(state['scores'])} candidates ({method}): held-out top-1 accuracy "
          f"{best['held_out_top1']:.2f}% at {best['macs'] / 1e6:.1f}M FLOPs, {best['params'] / 1e6:.2f}M params\n  "
          f"{search_space.describe(from_key(key_of(search_space.from_json(best))))}\n"
          f"wrote {output} and {output.with_suffix('.png')}")


# The flags a search's result depends on; the last two are recorded as the command resolves them.
_FLAG_SETTINGS = ("flops_min", "flops_max", "population", "top_k", "mutations", "mutation_prob", "crossovers",
                  "generations", "seed", "bn_images", "bn_batch_size", "score_images", "image_size", "supernet")


def _resumed_state(path: Path, fresh: dict, generations: int) -> dict:
    """The state saved at `path` when a search with these settings stopped there, else `fresh`."""
    if not path.exists():
        return fresh
    saved = _read_state(path, fresh)
    if changed := _changed_settings(saved, fresh):
        raise UserError(f"{path}: a search with other settings ({changed}); use another --output or delete it")
    # More --generations continue the search: generation g's candidates depend on the generations before only.
    if generations > saved["generation"]:
        saved["settings"] = fresh["settings"]
    return saved


def _read_state(path: Path, fresh: dict) -> dict:
    """The saved state of a stopped search at `path`; UserError for a file this script did not write whole."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        saved = None
    if not isinstance(saved, dict) or saved.keys() != fresh.keys():
        raise UserError(f"{path}: not the state of a search this script saved (it is unreadable or has other "
                        "contents); delete it, or give another --output")
    return saved


def _changed_settings(saved: dict, state: dict) -> str:
    """What a saved search did otherwise than this command ('--population 6 there, 8 here; ...'), --generations
    aside; empty when it can go on."""
    there = {"method": saved.get("method"), **(saved.get("settings") or {})}
    here = {"method": state["method"], **state["settings"]}

    def shown(key: str, value) -> str:
        return f"{value / 1e6:g}M" if key.startswith("flops") and isinstance(value, (int, float)) else str(value)

    changed = [f"{'--' + key.replace('_', '-') if key in _FLAG_SETTINGS else key.replace('_', ' ')} "
               f"{shown(key, there.get(key))} there, {shown(key, value)} here"
               for key, value in here.items() if key != "generations" and there.get(key) != value]
    return "; ".join(changed + (["the held-out images"] if saved.get("held_out") != state["held_out"] else []))


def _evolve(args, state, state_path, info, say, samples, bn_indices, score_indices, image_size, num_classes,
            metadata) -> None:
    device = info.device
    model = supernet_module.create_network(num_classes)
    load_model_state(model, args.supernet, for_inference=True)
    model.to(device)
    preprocess = Preprocess(InputFormat.from_dict(metadata["input_format"])).to(device)
    started = time.perf_counter()
    train_set = ImageDataset(samples, TrainTransform(image_size))
    seeds = np.random.default_rng([args.seed, 0xB18]).integers(0, 2**31, size=len(bn_indices))
    items = [(index, int(seed)) for index, seed in zip(bn_indices, seeds)]
    bn_batches = decode_batches(train_set, [items[i:i + args.bn_batch_size]
                                            for i in range(0, len(items), args.bn_batch_size)],
                                args.workers, image_size)
    score_set = ImageDataset(samples, EvalTransform(image_size))
    score_batches = decode_batches(score_set, [score_indices[i:i + args.batch_size]
                                               for i in range(0, len(score_indices), args.batch_size)],
                                   args.workers, image_size)
    scorer = Scorer(model, preprocess, bn_batches, score_batches, device)
    say(f"OneShot {state['method']} search: {args.generations} generation{'s' * (args.generations > 1)} of "
        f"{args.population}, FLOPs {args.flops_min / 1e6:g}M-{args.flops_max / 1e6:g}M; BN statistics from "
        f"{len(bn_indices)} training images, scores on {len(score_indices)} of {state['held_out']['images']} "
        f"held-out images ({time.perf_counter() - started:.0f} s to decode them); {info.world_size} x {device}")
    run_start, done_here = time.perf_counter(), 0
    while state["generation"] < args.generations:
        generation = state["generation"]
        generation_start = time.perf_counter()
        candidates = next_population(generation, state["scores"], args, num_classes)
        mine = {key_of(c): scorer(c) for c in candidates[info.rank::info.world_size]}
        for part in all_gather_objects(mine, info):
            state["scores"].update(part)
        keys = sorted(state["scores"], key=lambda k: (-state["scores"][k], k))
        state["populations"].append([key_of(c) for c in candidates])
        state["generation"] = generation + 1
        elapsed = time.perf_counter() - generation_start
        state["seconds"] += elapsed
        done_here += 1
        if info.is_main:
            write_json(state_path, state)
        per_generation = (time.perf_counter() - run_start) / done_here
        best = keys[0]
        say(f"[search] generation {generation + 1}/{args.generations} | {len(candidates)} candidates, "
            f"{len(candidates) / max(elapsed, 1e-9):.2f} candidates/s | best held-out top-1 accuracy "
            f"{state['scores'][best]:.2f}% at {search_space.costs(from_key(best), num_classes)[0] / 1e6:.1f}M "
            f"FLOPs | {len(state['scores'])} evaluated | ETA "
            f"{format_duration(per_generation * (args.generations - generation - 1))}", flush=True)


def run_demo() -> None:
    """The three stages on the built-in data, as a user would run them, with the found architecture against the
    best random one of as many candidates. Each stage resumes its own results in runs/search-demo, so a stopped
    demo run again goes on where it stopped."""
    from common.models import REPO_ROOT
    folder = Path(__file__).resolve().parent
    run = REPO_ROOT / "runs" / "search-demo"
    if run.exists():
        print(f"{run} holds an earlier demo's results: each stage goes on from them (delete the folder to start "
              "afresh)", flush=True)
    times = {}

    def step(title: str, command: list[str]) -> None:
        print(f"\n=== {title}\n$ python {' '.join(command)}", flush=True)
        started = time.perf_counter()
        status = run_script([sys.executable, *command], cwd=folder)
        if status:
            sys.exit(f"search demo: '{title}' failed with exit status {status}")
        times[title] = time.perf_counter() - started

    # Small paths (100M-300M FLOPs at 224px) for the supernet and a budget of 280M for the search, so the budget
    # binds: of two candidates the larger one tends to score better.
    search_flags = ["--population", "10", "--top-k", "3", "--mutations", "4", "--crossovers", "4",
                    "--generations", "4", "--bn-images", "64", "--bn-batch-size", "64", "--score-images", "180",
                    "--batch-size", "180", "--workers", "1", "--flops-min", "100e6", "--flops-max", "280e6"]
    step("train the supernet", ["train_supernet.py", "--demo", "--save", str(run / "supernet"), "--flops-min",
                                "100e6", "--flops-max", "300e6", "--held-out-per-class", "30", "--warmup-iters",
                                "10", "--workers", "1"])
    from common.checkpoint_store import get_latest_model
    checkpoint = str(get_latest_model(run / "supernet")[0])
    step("evolutionary search", ["search.py", "--supernet", checkpoint, "--output", str(run / "search.json"),
                                 *search_flags])
    step("random search", ["search.py", "--supernet", checkpoint, "--output", str(run / "random.json"),
                           "--random", *search_flags])
    step("retrain the found architecture", ["train.py", "--demo", "--architecture", str(run / "search.json"),
                                            "--save", str(run / "retrain"), "--image-size", "32", "--batch-size",
                                            "32", "--learning-rate", "0.02", "--total-iters", "60",
                                            "--val-interval", "60", "--save-interval", "60", "--workers", "1"])
    _print_demo_summary(run, times)


def _print_demo_summary(run: Path, times: dict[str, float]) -> None:
    """The demo's timings, the best architecture of each search and the retrained one's validation error."""
    from common.checkpoint_store import get_latest_model
    found = json.loads((run / "search.json").read_text())["architectures"][0]
    random_best = json.loads((run / "random.json").read_text())["architectures"][0]
    print(f"\nSearch demo finished in {sum(times.values()):.0f} s "
          f"({', '.join(f'{t}: {s:.0f} s' for t, s in times.items())}).")
    for name, arch in (("evolution", found), ("random", random_best)):
        print(f"  best of {name:9s}: held-out top-1 accuracy {arch['held_out_top1']:6.2f}%  {arch['macs'] / 1e6:6.1f}M "
              f"FLOPs  {arch['params'] / 1e6:.2f}M params  {search_space.describe(search_space.from_json(arch))}")
    retrained, iterations = get_latest_model(run / "retrain")
    metrics = read_checkpoint_metadata(retrained).get("metrics") or {}
    if "top1_error" in metrics:
        print(f"  the found architecture retrained from scratch for {iterations} iterations: validation top-1 "
              f"error {metrics['top1_error']:.1f}% (chance: 83.3%)")
    print(f"Files in {run}: supernet/, search.json (+ .png, .state.json), random.json, retrain/")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo:
        return search(args)
    # The demo runs each stage with settings of its own; a flag given beside it would be silently ignored.
    defaults = vars(parser.parse_args([]))  # as the flags' types read them
    given = [name for name, value in vars(args).items() if name != "demo" and value != defaults[name]]
    if given:
        parser.error(f"--demo runs the three stages with settings of its own; leave out "
                     f"{', '.join('--' + name.replace('_', '-') for name in given)} or --demo")
    if launched_world_size() > 1:
        # Each rank would run every stage into the same folder, and the stages would inherit its rank.
        raise UserError("--demo starts its stages as processes of its own: run it with python, not torchrun")
    run_demo()
    return None


if __name__ == "__main__":
    main()
