"""Training checkpoints store their tensors packed, one flat tensor per dtype and an index of shapes, so loading does
not pay torch.load's per-tensor cost (an unpickler step, a record lookup and a storage per tensor: seconds for
ExLarge's 5,000 tensors, more than reading its 3 GB). Unpacking gives views of the flat tensors, without a copy."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

# The key under which a packed object holds its tensors; each tensor's place holds {_REF: its number}.
PACK_KEY = "tensor_pack"
_REF = "tensor_pack_ref"
# Per dtype, the flat tensor the last pack used (see _buffer).
_BUFFERS: dict[torch.dtype, Tensor] = {}


def pack_tensors(state: Mapping) -> dict:
    """`state` with every tensor (at any depth of dicts, lists and tuples) replaced by a reference, and the tensors'
    values copied into one flat CPU tensor per dtype under PACK_KEY."""
    tensors: list[Tensor] = []

    def strip(obj: Any) -> dict | None:
        if isinstance(obj, Tensor):
            tensors.append(obj)
            return {_REF: len(tensors) - 1}
        return None

    skeleton = _rebuild(state, strip)
    dtypes = list(dict.fromkeys(tensor.dtype for tensor in tensors))
    flats = [_buffer(dtype, sum(t.numel() for t in tensors if t.dtype == dtype)) for dtype in dtypes]
    offsets = [0] * len(dtypes)
    groups, sizes = [dtypes.index(tensor.dtype) for tensor in tensors], []
    for tensor, group in zip(tensors, groups):
        flats[group][offsets[group]:offsets[group] + tensor.numel()].view(tensor.shape).copy_(tensor.detach())
        offsets[group] += tensor.numel()
        sizes += [tensor.dim(), *tensor.shape]
    return {**skeleton, PACK_KEY: {"storages": flats, "groups": torch.tensor(groups, dtype=torch.int64),
                                   "sizes": torch.tensor(sizes, dtype=torch.int64)}}


def _buffer(dtype: torch.dtype, count: int) -> Tensor:
    """A flat CPU tensor, the same one each time for the same dtype and size: a run saves states of one size again
    and again, and fresh memory costs a page fault per 4 KB on first touch (seconds for ExLarge's 3.3 GB). The
    packed state is written before the next save reuses it."""
    buffer = _BUFFERS.get(dtype)
    if buffer is None or buffer.numel() != count:
        _BUFFERS[dtype] = buffer = torch.empty(count, dtype=dtype)
    return buffer


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
