"""Turn a released or training checkpoint into a clean release file: weights only, .safetensors, with SHA-256.

    python -m common.release INPUT --output OUT.safetensors [--ema] [--trust-pickle] [--keep-side-heads]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import BinaryIO

import torch

from common.atomic_io import atomic_output, atomic_write_text, write_hashed
from common.checkpoint_store import to_plain
from common.cli import ArgumentParser, add_weights_arguments, prepare_output
from common.errors import UserError, exit_on_user_error
from common.model_state import (RELEASE_METADATA_KEY, classifier_rows, describe_weights, extract_model_state,
                                is_side_head, load_model_state, read_checkpoint_metadata, read_weights_file)
from common.models import MODEL_FOLDERS, load_network_module

# Training arguments are left out of a release: they name local paths and say nothing about using the weights.
_PRIVATE_METADATA = ("args",)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m common.release",
        description="Write the weights of a released or training checkpoint as a clean .safetensors release file "
                    "and its SHA-256.")
    parser.add_argument("input", metavar="INPUT",
                        help="a released weights file (.pkl/.pth, either layout), a training checkpoint of this "
                             "project, or a .safetensors file")
    parser.add_argument("--output", "-o", required=True, metavar="OUT.safetensors",
                        help="the release file to write; OUT.safetensors.sha256 is written beside it")
    add_weights_arguments(parser, "release")
    parser.add_argument("--keep-side-heads", action="store_true",
                        help="keep the training-only side heads predict_* (left out by default: evaluation "
                             "does not use them)")
    parser.add_argument("--model", choices=MODEL_FOLDERS,
                        help="also check that the weights load strictly into this network before writing")
    return parser


def shareable_metadata(metadata: dict) -> dict:
    """`metadata` without what only means something on the machine that trained: the rule for every file meant
    to be shared (releases, averages)."""
    return {key: value for key, value in metadata.items() if key not in _PRIVATE_METADATA}


def write_release(output: Path, weights: dict[str, torch.Tensor], metadata: dict) -> str:
    """Write a weights file to share (`.safetensors` with `metadata` as JSON, any other name a torch.save state dict)
    and `OUT.sha256` beside it, both atomically; returns the SHA-256. The one writer of releases and averages. The
    same weights and metadata give the same bytes, so a release made again has the same SHA-256."""
    output = Path(output)
    # Dense row-major tensors: a channels_last network's are not.
    released = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
    # A full disk raises an OSError naming the file: the scripts end with it in one line and status 1.
    output.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", RELEASE_METADATA_KEY: json.dumps(metadata, default=str)}

    def write(file: BinaryIO) -> None:
        if output.suffix == ".safetensors":
            _write_safetensors(file, released, header)
        else:
            torch.save(released, file)

    sidecar = output.with_name(output.name + ".sha256")
    with atomic_output(output) as temp:
        digest = write_hashed(temp, write)[0]
        # The two files cannot be replaced at once. Once the new file is complete, the old sidecar goes before it
        # replaces the old file: a kill between the two replaces leaves it without a sidecar, never beside the old
        # file's SHA-256; a failed write leaves the old pair as it was.
        sidecar.unlink(missing_ok=True)
    atomic_write_text(sidecar, f"{digest}  {output.name}\n")
    return digest


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _write_safetensors(file: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors layout, written here with its header in one fixed order: safetensors' own writer orders the
    metadata by a hash map, so the same release came out with other bytes, and another SHA-256, each time."""
    header, offset = {"__metadata__": metadata}, 0
    for name in sorted(tensors):
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    file.write(len(text).to_bytes(8, "little") + text)
    for name in sorted(tensors):
        file.write(tensors[name].reshape(-1).view(torch.uint8).numpy().data)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source, output = Path(args.input), Path(args.output)
    if output.suffix != ".safetensors":
        raise UserError(f"--output {output}: the release file name must end in .safetensors")
    if output.resolve() == source.resolve():
        raise UserError(f"--output {output} is the input file; choose another name")
    obj = read_weights_file(source, trust_pickle=args.trust_pickle)
    weights = {key: value for key, value in extract_model_state(obj, use_ema=args.use_ema, source=str(source)).items()
               if args.keep_side_heads or not is_side_head(key)}
    if args.model:
        network_module = load_network_module(args.model)
        network = network_module.create_network(num_classes=classifier_rows(network_module, weights))
        load_model_state(network, weights, strict=True, for_inference=not args.keep_side_heads,
                         source_name=str(source))
    # After the input is read and checked, so that a refused one leaves no output folder behind.
    prepare_output("--output", output)
    # The checkpoint's own metadata, without training arguments, and what the release holds.
    metadata = shareable_metadata(read_checkpoint_metadata(obj))
    metadata["contents"] = describe_weights(weights, metadata.get("arch"))
    metadata["weights"] = "ema" if args.use_ema else metadata.get("weights", "model")
    digest = write_release(output, weights, to_plain(metadata, json_only=True))
    print(f"wrote {output}: {len(weights)} tensors, {output.stat().st_size / 1e6:.1f} MB, {metadata['contents']}")
    print(f"{digest}  {output.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
