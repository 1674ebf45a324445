"""Training checkpoints store their tensors packed: one flat tensor per dtype, an index of shapes, and the rest of the
state pickled once into a byte tensor (the skeleton) that refers to the tensors by number. Loading then pays neither
torch.load's per-tensor cost (an unpickler step, a record lookup and a storage per tensor: seconds for ExLarge's 5,000
tensors, more than reading its 3 GB) nor its weights-only unpickler, written in Python, over 5,000 names (reading
ExLarge's file took 0.09 to 0.10 s with them, 0.02 to 0.04 s without): the skeleton is read by the C unpickler with
no class allowed but OrderedDict (a state dict). Top-level entries that hold no tensor stay as they are, so plain
`torch.load(weights_only=True)` shows a checkpoint's metadata. Unpacking gives views of the flat tensors, without a
copy. Packing copies nothing: torch.save writes placeholders, and the writer writes each tensor's own bytes in their
place."""
from __future__ import annotations

import collections
import io
import math
import pickle
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

# The key under which a packed object holds its tensors and its skeleton.
PACK_KEY = "tensor_pack"
# In the first packed layout (2026-11-30 to 2026-12-06), still read: the skeleton stood in the file's own pickle, each
# tensor's place holding {_REF: its number}.
_REF = "tensor_pack_ref"


def pack_tensors(state: Mapping) -> tuple[dict, Callable[[memoryview], Iterator[memoryview] | None]]:
    """`state` as torch.save should write it: its entries without tensors as they are, and under PACK_KEY the rest
    pickled into a skeleton with every tensor (at any depth) replaced by its number, and one flat placeholder tensor
    per dtype, never filled; and `tensor_bytes(data)`, which maps torch.save's write of a placeholder to the bytes of
    its tensors in order, as a flat tensor holding them would hold them (None for any other write). Write the packed
    state with `write_hashed(..., substitute=tensor_bytes)` before the tensors change. TypeError for an object other
    than tensors, plain values and (ordered) dicts, lists and tuples."""
    plain = {key: value for key, value in state.items() if not _holds_tensor(value)}
    tensors: list[Tensor] = []
    skeleton = io.BytesIO()
    _SkeletonPickler(skeleton, tensors).dump({key: value for key, value in state.items() if key not in plain})
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

    return {**plain, PACK_KEY: {"storages": flats, "groups": torch.tensor(groups, dtype=torch.int64),
                                "sizes": torch.tensor(sizes, dtype=torch.int64),
                                "skeleton": torch.frombuffer(bytearray(skeleton.getbuffer()), dtype=torch.uint8)}
            }, tensor_bytes


def _bytes_of(tensor: Tensor) -> memoryview:
    """The tensor's values in row-major order on the CPU, without a copy where they already are."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def unpack_tensors(obj: Any) -> Any:
    """The object `pack_tensors` was given, its tensors views of the packed ones; anything else as it is.
    pickle.UnpicklingError for a skeleton that names any class but OrderedDict or a tensor that is not there."""
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
    plain = {key: value for key, value in obj.items() if key != PACK_KEY}
    if "skeleton" not in pack:  # the first packed layout
        return _rebuild(plain, lambda part: tensors[part[_REF]] if isinstance(part, dict) and part.keys() == {_REF}
                        else None)
    return {**plain, **_SkeletonUnpickler(pack["skeleton"].numpy().tobytes(), tensors).load()}


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(value) for value in obj.values())
    return isinstance(obj, (list, tuple)) and any(_holds_tensor(item) for item in obj)


class _SkeletonPickler(pickle.Pickler):
    """Pickles tensors as their number in `tensors` (appending them) and refuses what the unpickler would refuse."""

    def __init__(self, file: io.BytesIO, tensors: list[Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None

    def reducer_override(self, obj: Any) -> Any:
        if obj is not collections.OrderedDict and type(obj) is not collections.OrderedDict:
            raise TypeError(f"a checkpoint holds tensors and plain values only, not {type(obj).__name__}")
        return NotImplemented


class _SkeletonUnpickler(pickle.Unpickler):
    """The C unpickler restricted to plain values, OrderedDict and the numbered tensors: it runs no code."""

    def __init__(self, data: bytes, tensors: list[Tensor]) -> None:
        super().__init__(io.BytesIO(data))
        self.tensors = tensors

    def persistent_load(self, number: Any) -> Tensor:
        if not isinstance(number, int) or not 0 <= number < len(self.tensors):
            raise pickle.UnpicklingError(f"the skeleton refers to tensor {number!r} of {len(self.tensors)}")
        return self.tensors[number]

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"the skeleton names {module}.{name}, which a checkpoint never holds")


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
