"""Training checkpoints store their tensors packed: one flat tensor per dtype, an index of shapes, and the rest of the
state pickled once into a byte tensor (the skeleton) that refers to the tensors by number. torch.load's per-tensor
cost and its Python weights-only unpickler are paid once per dtype, not once per tensor; the skeleton is read by the
C unpickler with no class allowed but OrderedDict. Entries that hold no tensor stay readable with plain torch.load."""
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
    """(`state` to torch.save: tensor-free entries as they are, the rest under PACK_KEY as a skeleton and one unfilled
    placeholder per dtype; `tensor_bytes`, the `write_hashed` substitute that writes the tensors in the placeholders).
    TypeError for anything but tensors, plain values and (ordered) dicts, lists and tuples."""
    plain = {key: value for key, value in state.items() if not _holds_tensor(value)}
    tensors: list[Tensor] = []
    skeleton = io.BytesIO()
    _SkeletonPickler(skeleton, tensors).dump({key: value for key, value in state.items() if key not in plain})
    dtypes = list(dict.fromkeys(tensor.dtype for tensor in tensors))
    by_dtype = [[tensor for tensor in tensors if tensor.dtype == dtype] for dtype in dtypes]
    # Untouched memory: the placeholders cost address space only, as torch.save never reads them.
    flats = [torch.empty(sum(t.numel() for t in group), dtype=dtype) for dtype, group in zip(dtypes, by_dtype)]
    sizes = [number for tensor in tensors for number in (tensor.dim(), *tensor.shape)]

    def tensor_bytes(data: memoryview) -> Iterator[memoryview] | None:
        start = np.frombuffer(data, dtype=np.uint8).ctypes.data if len(data) else 0
        for flat, group in zip(flats, by_dtype):
            if flat.data_ptr() <= start < flat.data_ptr() + flat.nbytes:
                if (start, len(data)) != (flat.data_ptr(), flat.nbytes):
                    raise RuntimeError("torch.save wrote part of a placeholder: each must be written whole")
                # One at a time: a tensor that is not contiguous is copied just before it is written.
                return (_bytes_of(tensor) for tensor in group if tensor.numel())
        return None

    groups = torch.tensor([dtypes.index(tensor.dtype) for tensor in tensors], dtype=torch.int64)
    return {**plain, PACK_KEY: {"storages": flats, "groups": groups, "sizes": torch.tensor(sizes, dtype=torch.int64),
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
        return _replace_refs(plain, tensors)
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


def _replace_refs(obj: Any, tensors: list[Tensor]) -> Any:
    """`obj` with each {_REF: number} replaced by its tensor, dict types and attributes (`_metadata`) kept."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_refs(item, tensors) for item in obj)
    if not isinstance(obj, dict):
        return obj
    if obj.keys() == {_REF}:
        return tensors[obj[_REF]]
    items = {key: _replace_refs(value, tensors) for key, value in obj.items()}
    if type(obj) is dict:
        return items
    copy = type(obj)(items)
    copy.__dict__.update(getattr(obj, "__dict__", {}))
    return copy
