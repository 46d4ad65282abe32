"""Tensors between the parent and its child: a ring of shared-memory slots, small headers.

One :class:`SlotRing` is one ``multiprocessing.shared_memory`` segment cut into ``slots``
equal slots; each slot has an input region (parent writes, child reads) and an output region
(child writes, parent reads), so an output that aliases its input (``lambda x: x``) can never
overwrite it while it is being copied. An item (or a batch: it moves as one item) owns one
slot from its submit until the parent has copied its outputs out; the pipe then carries only
a header: the slot, and per tensor its dtype, shape and offset.

The segment is created by the parent and *unlinked as soon as the child has attached it*
(:meth:`SlotRing.unlink`): both mappings stay valid, and from then on no name exists in
``/dev/shm`` that a crash of either side could leave behind. Before that moment, Python's
resource tracker (shared by the parent and its children) unlinks it if the parent dies.

What does not fit (arrays larger than a region, object arrays, plain Python values of the
``function`` backend) travels pickled on the pipe instead: correct, only slower.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from ..tensors import TensorSpec

__all__ = ["ALIGN", "DEFAULT_REGION_BYTES", "SlotRing", "decode", "encode", "region_bytes"]

#: every tensor starts on a multiple of this (cache lines; SIMD loads in the runtimes)
ALIGN = 64
#: a region's size when the specs do not tell (dynamic shapes, no spec at all)
DEFAULT_REGION_BYTES = 1 << 20

#: header kinds
_PICKLED, _ONE, _DICT, _LIST, _TUPLE = "p", "1", "d", "l", "t"


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def region_bytes(specs: list[TensorSpec] | None, rows: int,
                 default: int = DEFAULT_REGION_BYTES) -> int:
    """Bytes one region needs for tensors of ``specs`` with ``rows`` rows on a dynamic first
    axis (a batch); ``default`` when a shape is not fully known."""
    if not specs:
        return default
    total = 0
    for spec in specs:
        if spec.shape is None:
            return default
        dims = list(spec.shape)
        if dims and dims[0] is None:
            dims[0] = rows
        elif dims and rows > 1:
            dims[0] = dims[0] * rows  # type: ignore[operator] # a batch of fixed-row items
        if any(d is None for d in dims):
            return default
        try:
            itemsize = np.dtype(spec.dtype).itemsize
        except TypeError:
            return default
        total += _aligned(math.prod(d for d in dims if d is not None) * itemsize)
    return max(total, ALIGN)


class SlotRing:
    """``slots`` slots of ``in_bytes + out_bytes`` in one shared-memory segment."""

    def __init__(self, slots: int, in_bytes: int, out_bytes: int, name: str | None = None):
        self.slots = slots
        self.in_bytes = _aligned(max(in_bytes, ALIGN))
        self.out_bytes = _aligned(max(out_bytes, ALIGN))
        self.slot_bytes = self.in_bytes + self.out_bytes
        if name is None:
            self._shm = shared_memory.SharedMemory(create=True, size=slots * self.slot_bytes)
            self._owner = True
        else:
            self._shm = shared_memory.SharedMemory(name=name)
            self._owner = False
        self.name = self._shm.name
        # one export of the buffer for the ring's lifetime: views are slices of it
        buf = self._shm.buf
        assert buf is not None
        self._bytes: np.ndarray | None = np.frombuffer(buf, np.uint8)
        self._unlinked = False

    def describe(self) -> tuple[str, int, int, int]:
        """What the other side needs to attach: name, slots, region sizes."""
        return self.name, self.slots, self.in_bytes, self.out_bytes

    @classmethod
    def attach(cls, name: str, slots: int, in_bytes: int, out_bytes: int) -> SlotRing:
        return cls(slots, in_bytes, out_bytes, name=name)

    def region(self, slot: int, output: bool) -> np.ndarray:
        """The bytes of one slot's input or output region (a view: no copy)."""
        data = self._bytes
        if data is None:
            raise RuntimeError("the slot ring is closed")
        start = slot * self.slot_bytes + (self.in_bytes if output else 0)
        return data[start:start + (self.out_bytes if output else self.in_bytes)]

    def unlink(self) -> None:
        """Remove the segment's name (both sides keep their mapping); idempotent."""
        if self._unlinked or not self._owner:
            return
        self._unlinked = True
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap (and, on the creating side, unlink if not done yet); idempotent."""
        self.unlink()
        self._bytes = None
        try:
            self._shm.close()
        except BufferError:  # a view someone still holds: the mapping goes with it
            pass


def _arrays(value: Any) -> tuple[str, list[Any], list[np.ndarray]] | None:
    """(kind, keys, arrays) when ``value`` is made of plain numeric arrays, else None."""
    if type(value) is np.ndarray:
        return _ONE, [], [value]
    if isinstance(value, Mapping):
        keys = list(value)
        items = [value[k] for k in keys]
        kind = _DICT
    elif isinstance(value, (list, tuple)):
        keys = []
        items = list(value)
        kind = _TUPLE if isinstance(value, tuple) else _LIST
    else:
        return None
    if not items or not all(type(a) is np.ndarray for a in items):
        return None
    return kind, keys, items


def encode(value: Any, region: np.ndarray) -> tuple[Any, ...]:
    """Write ``value``'s arrays into ``region`` and return the header that describes them, or
    a header carrying ``value`` pickled when it cannot go through shared memory."""
    parts = _arrays(value)
    if parts is not None:
        kind, keys, arrays = parts
        layout = []
        offset = 0
        ok = True
        for array in arrays:
            dtype = array.dtype
            if dtype.hasobject or dtype.kind in "OUSV" or not dtype.isnative:
                ok = False
                break
            end = offset + array.nbytes
            if end > region.size:
                ok = False
                break
            layout.append((dtype.str, array.shape, offset))
            offset = _aligned(end)
        if ok:
            for array, (_, shape, off) in zip(arrays, layout, strict=True):
                if array.nbytes:
                    target = region[off:off + array.nbytes].view(array.dtype).reshape(shape)
                    np.copyto(target, array, casting="no")
            return (kind, keys, layout)
    return (_PICKLED, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def decode(header: tuple[Any, ...], region: np.ndarray, copy: bool) -> Any:
    """The value ``header`` describes; ``copy=False`` gives views on the region (zero copy:
    valid only while the slot is held)."""
    kind = header[0]
    if kind == _PICKLED:
        return pickle.loads(header[1])
    _, keys, layout = header
    arrays = []
    for dtype_str, shape, off in layout:
        dtype = np.dtype(dtype_str)
        nbytes = math.prod(shape) * dtype.itemsize
        view = region[off:off + nbytes].view(dtype).reshape(shape)
        arrays.append(view.copy() if copy else view)
    if kind == _ONE:
        return arrays[0]
    if kind == _DICT:
        return dict(zip(keys, arrays, strict=True))
    if kind == _TUPLE:
        return tuple(arrays)
    return arrays
