"""Model weights in and out: reading weights files without running their code, released layouts, checked loading.
The released 2019 files (MODELS.md, "Released checkpoint files") come as a flat dict or `{'state_dict': ...}`, with
or without `module.` prefixes, `num_batches_tracked` or side heads, and with two names for the squeeze-excitation
weights: all of these load strictly into this project's networks."""
from __future__ import annotations

import functools
import json
import mmap
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from common.backbone import _under
from common.errors import UserError, listed
from common.models import MODEL_FOLDERS, load_network_module
from common.tensor_pack import unpack_tensors

# Tag stored in the checkpoints written by common.checkpoint: extract_model_state recognises them by it.
CHECKPOINT_FORMAT = "shufflenet-series/training-checkpoint/1"
# Key of the safetensors metadata entry that holds this project's metadata as one JSON string.
RELEASE_METADATA_KEY = "shufflenet_series"

_PREFIXES = ("module.", "_orig_mod.")
_SE_ALIASES = ((".se_block.0.", ".se_fc1."), (".se_block.2.", ".se_fc2."))
# Keys under which other training scripts keep the model or its EMA inside a larger checkpoint dict.
_MODEL_KEYS = ("state_dict", "model", "model_state_dict", "net")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
_SHOWN = 3
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
# What export.py writes, by suffix: never weights this project reads.
_EXPORTS = {".onnx": "an ONNX model", ".pte": "an ExecuTorch program", ".mlpackage": "a Core ML package",
            ".mlmodel": "a Core ML model"}


class WeightsFileError(UserError):
    """A weights file that cannot be read: missing, empty, truncated, not weights, or unsafe to unpickle."""


class WeightsMismatchError(UserError):
    """Weights whose names or shapes do not fit the model."""


class SafetensorsWeights(dict):
    """The tensors of a `.safetensors` file, with the file's string metadata in `.metadata`."""

    metadata: dict[str, str]

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


@dataclass
class LoadReport:
    """What load_model_state did: how many tensors it copied, which it left alone."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    source: str = "the weights"

    def summary(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source}"
        if self.missing:
            text += f"; kept the model's values for {len(self.missing)} missing ({listed(self.missing)})"
        if self.unexpected:
            text += f"; ignored {len(self.unexpected)} unexpected ({listed(self.unexpected)})"
        return text


def unwrap_model(model: Any) -> nn.Module:
    """The network inside DistributedDataParallel, DataParallel, torch.compile and EMA wrappers, at any depth."""
    from timm.utils import unwrap_model as unwrap  # imported here: timm imports torchvision, which --help need not

    return unwrap(model)


def read_weights_file(path: str | os.PathLike, trust_pickle: bool = False, *, verify: bool = True) -> Any:
    """The object in a weights file (a SafetensorsWeights dict, else torch.load's), read without running its code
    unless `trust_pickle`; failures are WeightsFileErrors. A training checkpoint of this project is first checked
    against its sidecar's SHA-256 (CheckpointCorruptError), unless `verify=False`."""
    path = Path(path)
    checked = None
    if verify:
        # here: checkpoint_store reads files through this module
        from common.checkpoint_store import CheckpointWarning, verify_if_checkpoint
        checked = verify_if_checkpoint(path)
    kind, size = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path, size)
    try:
        # mmap maps the zip's tensor records instead of reading them into fresh memory; copies are made only
        # where the tensors land (the model), and a private mapping keeps the file unchanged when they are written.
        if kind == "zip" and os.name == "posix":
            with torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE):
                obj = unpack_tensors(torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True))
        else:
            obj = unpack_tensors(torch.load(path, map_location="cpu", weights_only=not trust_pickle))
    except Exception as error:  # torch.load raises many types for damaged files; all are classified below
        raise _load_error(path, kind, size, error) from error
    if verify and checked is None and isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        warnings.warn(f"{path} is a training checkpoint without its sidecar (train.py writes checkpoint-<iteration>"
                      ".json beside it; copy both, names unchanged), so its SHA-256 could not be checked",
                      CheckpointWarning, stacklevel=2)
    return obj


def extract_model_state(obj: Any, *, use_ema: bool = False, source: str = "the weights") -> dict[str, torch.Tensor]:
    """The model's tensors from any accepted layout under clean names, in a new dict: `module.`/`_orig_mod.`
    prefixes stripped, SE aliases mapped. A tensor stored under two names with different values means a damaged file."""
    weights = _find_weights(obj, use_ema, source)
    names = {}  # key -> (clean name, whether it is an SE alias)
    for key, value in weights.items():
        if isinstance(value, torch.Tensor):
            name = key
            while name.startswith(_PREFIXES):
                name = name.split(".", 1)[1]
            real = name
            for alias, target in _SE_ALIASES:
                real = real.replace(alias, target)
            names[key] = (real, real != name)
    clean: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    # Aliases go in last, so the clean name wins when a file has both (after checking they agree).
    for key in sorted(names, key=lambda key: names[key][1]):
        name, value = names[key][0], weights[key]
        kept = clean.get(name)
        if kept is None:
            clean[name], origin[name] = value, key
        elif kept.shape != value.shape or (kept.data_ptr() != value.data_ptr() and not torch.equal(kept, value)):
            raise WeightsFileError(f"{source} holds two different tensors for {name} (as {origin[name]} and {key}): "
                                   "the file is damaged or was edited; use the original file")
    if not clean:
        raise WeightsFileError(f"{source} holds no tensors ({_describe_container(weights)}); "
                               "is it a weights file of this project?")
    return clean


def read_model_state(source: Any, *, trust_pickle: bool = False, use_ema: bool = False,
                     source_name: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(clean model tensors, name for messages) of `source`: a path, read with `read_weights_file`, or a read object."""
    if isinstance(source, (str, os.PathLike)):
        source_name = source_name or str(source)
        source = read_weights_file(source, trust_pickle=trust_pickle)
    source_name = source_name or "the weights"
    return extract_model_state(source, use_ema=use_ema, source=source_name), source_name


def load_model_state(model: Any, source: Any, strict: bool = True, for_inference: bool = False,
                     trust_pickle: bool = False, use_ema: bool = False, *,
                     source_name: str | None = None) -> LoadReport:
    """Copy weights from `source` (a path or a read object) into the unwrapped `model`, every shape checked first.
    Missing `num_batches_tracked` is fine; `for_inference` also accepts missing side heads. `strict=False` loads the
    keys both sides have, but refuses mis-shaped keys and a source that fits nothing."""
    state, name = read_model_state(source, trust_pickle=trust_pickle, use_ema=use_ema, source_name=source_name)
    module = unwrap_model(model)
    target = module.state_dict()
    missing = [key for key in target if key not in state]
    unexpected = [key for key in state if key not in target]
    misshaped = [key for key in target if key in state and state[key].shape != target[key].shape]
    required = [key for key in missing
                if not key.endswith("num_batches_tracked") and not (for_inference and is_side_head(key))]
    loadable = len(target) - len(missing) - len(misshaped)
    if misshaped or loadable == 0 or (strict and (required or unexpected)):
        raise WeightsMismatchError(_mismatch_message(module, name, state, target, required if strict else [],
                                                     unexpected if strict else [], misshaped, loadable))
    # load_state_dict (not a bare copy_) so modules with their own loading hooks still get them.
    module.load_state_dict({key: state[key] for key in target if key in state}, strict=False)
    return LoadReport(loaded=loadable, missing=missing, unexpected=unexpected, source=name)


def read_checkpoint_metadata(path_or_obj: Any) -> dict:
    """Plain metadata (arch, classes, image_size, input_format, args, ...) stored by this project; {} otherwise.
    A training checkpoint's also gives `iteration` and `metrics`. Cheap from a path: mapped, or only the header read."""
    if isinstance(path_or_obj, (str, os.PathLike)):
        path = Path(path_or_obj)
        kind, size = _sniff(path)
        if kind not in ("safetensors", "zip"):
            return {}
        path_or_obj = _read_safetensors(path, size, tensors=False) if kind == "safetensors" else read_weights_file(path)
    if isinstance(path_or_obj, SafetensorsWeights):
        try:
            return json.loads(path_or_obj.metadata.get(RELEASE_METADATA_KEY) or "{}")
        except json.JSONDecodeError:
            return {}
    if isinstance(path_or_obj, Mapping) and path_or_obj.get("format") == CHECKPOINT_FORMAT:
        return {**(path_or_obj.get("metadata") or {}), "iteration": path_or_obj["iteration"],
                "metrics": dict(path_or_obj.get("metrics") or {})}
    return {}


def check_model_folder(label: str, metadata: Mapping, model_name: str, script: str | None = None) -> None:
    """A one-line error when `metadata` says the weights (`label`: the flag and path, or the path) are another model
    folder's than `model_name`: it names that folder's `script` to use instead, when given."""
    arch = metadata.get("arch")
    if arch in (None, model_name):
        return
    if "supernet" in metadata:  # train_supernet.py's: many networks in one, none of them to run as it is
        folder = arch.removesuffix("-supernet")
        raise UserError(f"{label}: a supernet of {folder}/train_supernet.py, not one network; search it with "
                        f"{folder}/search.py --supernet, then train the architecture found with {folder}/train.py "
                        "--architecture")
    raise UserError(f"{label}: a {arch} checkpoint; use {arch}/{script}" if script else
                    f"{label}: a {arch} file, not {model_name}")


def describe_weights(state: Mapping[str, torch.Tensor], arch: str | None = None) -> str:
    """A guess of what a clean state dict holds, e.g. "a ShuffleNetV2.Large state dict with 1000 classes": the model
    with the most of its tensor names (then the one it covers most of), with the classes of its classifier. The
    `arch` its metadata names, when no model folder is that (a supernet), is taken at its word."""
    if arch is not None and arch not in MODEL_FOLDERS:
        return f"a {arch} state dict"
    shared = {model: len(state.keys() & _tensor_names(model)) for model in MODEL_FOLDERS}
    model = max(shared, key=lambda name: (shared[name], shared[name] / len(_tensor_names(name))))
    if shared[model] < 0.5 * len(state):
        return f"{len(state)} tensors that fit none of {', '.join(MODEL_FOLDERS)} (first keys: {listed(list(state))})"
    rows = _classifier_rows(state, load_network_module(model).CLASSIFIER)
    return f"a {model} state dict with {'an unknown number of' if rows is None else rows} classes"


def classifier_rows(network: Any, weights: Any) -> int:
    """The number of classes of a weights object (`network`: a folder's network.py), read from the last weight
    matrix under its CLASSIFIER; 1000 where there is none."""
    rows = _classifier_rows(extract_model_state(weights), network.CLASSIFIER)
    return 1000 if rows is None else rows


def output_classes(network: Any, weights: Any, metadata: Mapping) -> tuple[int, list[str]]:
    """(number of outputs, their class names) of a weights object: its metadata's, else its classifier's rows, named
    by ImageNet's wnids when there are 1000 and "output i" otherwise (a plain state dict names no classes)."""
    from common.imagenet import imagenet_wnids, output_names

    num_classes = metadata.get("num_classes") or classifier_rows(network, weights)
    classes = metadata.get("classes") or (imagenet_wnids() if num_classes == 1000 else output_names([], num_classes))
    return num_classes, list(classes)


def _classifier_rows(state: Mapping[str, torch.Tensor], classifier: str) -> int | None:
    rows = [value.shape[0] for key, value in state.items() if _under(key, classifier) and value.dim() == 2]
    return rows[-1] if rows else None


@functools.cache
def _tensor_names(model: str) -> frozenset[str]:
    with torch.device("meta"):  # names only: no memory, no initialisation
        return frozenset(load_network_module(model).create_network().state_dict())


def _sniff(path: Path) -> tuple[str, int]:
    """('safetensors' | 'zip' | 'pickle' | 'unknown', size) from the first bytes; errors for what is no file."""
    try:
        size = path.stat().st_size
        if path.suffix in _EXPORTS or (path / "Manifest.json").is_file():
            raise WeightsFileError(f"{path} is an export ({_EXPORTS.get(path.suffix, 'a Core ML package')}), not "
                                   "weights; give the weights file it was exported from (.pth, .pkl, .safetensors)")
        if path.is_dir():
            raise WeightsFileError(f"{path} is a folder, not a weights file; give the path of the file")
        with open(path, "rb") as file:
            head = file.read(64)
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: no such file; check the path") from None
    except OSError as error:
        raise WeightsFileError(f"{path} cannot be read: {error.strerror}") from None
    if size == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes): the download or copy failed; fetch the file again")
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        raise WeightsFileError(f"{path} is an HTML/XML page, not weights: a failed download saved the server's "
                               "error or login page; download the file again and check the URL")
    # safetensors: an 8-byte little-endian header length, then the JSON header (checked fully on reading).
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32:
        return "safetensors", size
    if head.startswith(b"PK\x03\x04"):
        return "zip", size
    # Pickle protocol 2 and later, which is what torch.save has written since 2017.
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle", size
    return "unknown", size


def _load_error(path: Path, kind: str, size: int, error: Exception) -> WeightsFileError:
    found = _GLOBAL_RE.search(str(error))
    if found:
        return WeightsFileError(
            f"{path} holds Python objects ({found.group(1)}) that only load by running code stored in the file; "
            "loading it could run anything on this machine, so it was refused; pass --trust-pickle only for a "
            "file you made yourself (trust_pickle=True in Python)")
    if kind == "unknown":
        with open(path, "rb") as file:
            head = file.read(24)
        text = head.decode("ascii", errors="replace")
        shown = repr(text) if text.isprintable() else f"bytes {head[:8].hex(' ')}"
        return WeightsFileError(f"{path} is not a PyTorch or safetensors weights file (it starts with {shown}); "
                                "check that it is the file you meant")
    ends_early = (kind == "zip" and not _zip_has_end(path, size)) or isinstance(error, (EOFError, IndexError)) \
        or "EOF" in str(error) or "unpack requires" in str(error)
    return _broken_download(path, size, ends_early, error)


def _broken_download(path: Path, size: int, ends_early: bool, error: Exception) -> WeightsFileError:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    first = first if len(first) <= 100 else first[:97] + "..."
    what = f"ends early ({size} bytes)" if ends_early else f"is damaged ({first})"
    return WeightsFileError(f"{path} {what}: an interrupted download? compare its size/MD5 with the published "
                            "one and download it again")


def _zip_has_end(path: Path, size: int) -> bool:
    """Whether the zip's end-of-central-directory record is present (a truncated archive loses it first)."""
    with open(path, "rb") as file:
        file.seek(max(0, size - 65_557))  # the record is 22 bytes plus a comment of at most 65,535
        return b"PK\x05\x06" in file.read()


def _read_safetensors(path: Path, size: int, tensors: bool = True) -> SafetensorsWeights:
    """The file's tensors (none unless `tensors`: the header alone) and metadata."""
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            return SafetensorsWeights({key: file.get_tensor(key) for key in file.keys() if tensors}, file.metadata())
    except (SafetensorError, OSError, ValueError) as error:
        raise _broken_download(path, size, _safetensors_needs(path) > size, error) from None


def _safetensors_needs(path: Path) -> int:
    """The size a .safetensors file must have by its header; 0 when the header itself is unreadable."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = file.read(length)
    if len(header) < length:
        return 8 + length
    try:
        entries = json.loads(header).values()
        return 8 + length + max((entry["data_offsets"][1] for entry in entries if "data_offsets" in entry),
                                default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return 0


def _find_weights(obj: Any, use_ema: bool, source: str) -> Mapping:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{source} holds a {type(obj).__name__}, not a dict of weights; "
                               "is it a weights file?")
    if obj.get("format") == CHECKPOINT_FORMAT:
        if not use_ema:
            return obj["model"]
        ema = obj.get("ema")
        if ema is None:
            raise WeightsFileError(f"{source} is a training checkpoint without EMA weights; load it without --ema")
        return ema["module"]
    for key in _EMA_KEYS if use_ema else _MODEL_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    if use_ema:
        raise WeightsFileError(f"{source} holds no EMA weights ({_describe_container(obj)}); load it without --ema")
    return obj


def mismatch_parts(state: Mapping, target: Mapping, missing: list[str], unexpected: list[str],
                   misshaped: list[str]) -> list[str]:
    """The pieces of a does-not-fit message: counts and first keys of each kind of mismatch."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({listed(unexpected)})")
    if misshaped:
        shapes = ", ".join(f"{key}: file {tuple(state[key].shape)} vs model {tuple(target[key].shape)}"
                           for key in misshaped[:_SHOWN])
        parts.append(f"{len(misshaped)} with other shapes ({shapes}{', ...' if len(misshaped) > _SHOWN else ''})")
    return parts


def _mismatch_message(module: nn.Module, source: str, state: Mapping, target: Mapping, missing: list[str],
                      unexpected: list[str], misshaped: list[str], loadable: int) -> str:
    parts = mismatch_parts(state, target, missing, unexpected, misshaped) + (["no tensor fits"] if not loadable else [])
    advice = "load weights made for this model and number of classes"
    if missing and all(is_side_head(key) for key in missing):
        advice = "only the training side heads predict_* are missing: fine for evaluation (for_inference=True)"
    return (f"{source} does not fit {type(module).__name__}: {'; '.join(parts)}; "
            f"the file looks like {describe_weights(state)}; {advice}")


def is_side_head(key: str) -> bool:
    """Whether a state-dict key belongs to a training-only side head: the networks name them `predict_*`
    (their SIDE_HEADS); evaluation, export and releases leave them out."""
    return key.startswith("predict_")


def _describe_container(obj: Mapping) -> str:
    keys = [str(key) for key in obj]
    return f"top-level keys: {listed(keys)}" if keys else "it is an empty dict"
