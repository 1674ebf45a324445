"""Training checkpoints store their tensors packed, one flat tensor per dtype and an index of shapes, so loading does
not pay torch.load's per-tensor cost (an unpickler step, a record lookup and a storage per tensor: seconds for
ExLarge's 5,000 tensors, more than reading its 3 GB). Unpacking gives views of the flat tensors, without a copy.
Packing copies nothing: torch.save writes placeholders, and the writer writes each tensor's own bytes in their place."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

# The key under which a packed object holds its tensors; each tensor's place holds {_REF: its number}.
PACK_KEY = "tensor_pack"
_REF = "tensor_pack_ref"


def pack_tensors(state: Mapping) -> tuple[dict, Callable[[memoryview], Iterator[memoryview] | None]]:
    """`state` with every tensor (at any depth of dicts, lists and tuples) replaced by a reference, and under PACK_KEY
    one flat placeholder tensor per dtype, never filled; and `tensor_bytes(data)`, which maps torch.save's write of a
    placeholder to the bytes of its tensors in order, as a flat tensor holding them would hold them (None for any
    other write). Write the packed state with `write_hashed(..., substitute=tensor_bytes)` before the tensors
    change."""
    tensors: list[Tensor] = []

    def strip(obj: Any) -> dict | None:
        if isinstance(obj, Tensor):
            tensors.append(obj)
            return {_REF: len(tensors) - 1}
        return None

    skeleton = _rebuild(state, strip)
    dtypes = list(dict.fromkeys(tensor.dtype for tensor in tensors))
    groups = [dtypes.index(tensor.dtype) for tensor in tensors]
    # Untouched memory: the placeholders cost address space only, as torch.save never reads them.
    flats = [torch.empty(sum(t.numel() for t in tensors if t.dtype == dtype), dtype=dtype) for dtype in dtypes]
    members = [(flat.data_ptr(), flat.nbytes, [t for t, group in zip(tensors, groups) if group == index])
               for index, flat in enumerate(flats)]
    sizes = [number for tensor in tensors for number in (tensor.dim(), *tensor.shape)]

    def tensor_bytes(data: memoryview) -> Iterator[memoryview] | None:
        start = np.frombuffer(data, dtype=np.uint8).ctypes.data if len(data) else 0
        for address, nbytes, flat in members:
            if address <= start < address + nbytes:
                if (start, len(data)) != (address, nbytes):
                    raise RuntimeError("torch.save wrote part of a placeholder: each must be written whole")
                # One at a time: a tensor that is not contiguous is copied just before it is written.
                return (_bytes_of(tensor) for tensor in flat if tensor.numel())
        return None

    return {**skeleton, PACK_KEY: {"storages": flats, "groups": torch.tensor(groups, dtype=torch.int64),
                                   "sizes": torch.tensor(sizes, dtype=torch.int64)}}, tensor_bytes


def _bytes_of(tensor: Tensor) -> memoryview:
    """The tensor's values in row-major order on the CPU, without a copy where they already are."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def unpack_tensors(obj: Any) -> Any:
    """The object `pack_tensors` was given, its tensors views of the packed ones; anything else as it is."""
    if not isinstance(obj, Mapping) or PACK_KEY not in obj:
        return obj
    pack = obj[PACK_KEY]
    storages, sizes = pack["storages"], pack["sizes"].tolist()
    offsets = [0] * len(storages)
    tensors, at = [], 0
    for group in pack["groups"].tolist():
        shape = sizes[at + 1:at + 1 + sizes[at]]
        at += 1 + len(shape)
        count = math.prod(shape)
        tensors.append(storages[group][offsets[group]:offsets[group] + count].view(shape))
        offsets[group] += count
    return _rebuild({key: value for key, value in obj.items() if key != PACK_KEY},
                    lambda part: tensors[part[_REF]] if isinstance(part, dict) and part.keys() == {_REF} else None)


def _rebuild(obj: Any, convert: Callable[[Any], Any]) -> Any:
    """`obj` with each part that `convert` maps to something other than None replaced, through dicts, lists, tuples."""
    converted = convert(obj)
    if converted is not None:
        return converted
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rebuild(item, convert) for item in obj)
    if isinstance(obj, dict):
        return _same_kind(obj, {key: _rebuild(value, convert) for key, value in obj.items()})
    return obj


def _same_kind(original: dict, items: dict) -> dict:
    """`items` as the original's dict type, with its attributes (a state_dict's `_metadata` holds module versions)."""
    if type(original) is dict:
        return items
    copy = type(original)(items)
    copy.__dict__.update(getattr(original, "__dict__", {}))
    return copy
