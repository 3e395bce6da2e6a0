"""A KV cache layer that appends in place: decode steps stop copying the whole cache.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``, which
copies every cached position of every row, in every layer, at every step: the cost of a
step grows with the context (on a ~110M Llama at 512 cached positions, batch 8, float32,
the copies took longer than the attention itself). :class:`GrowingLayer` keeps its keys and
values in buffers with spare positions and writes each step into them; only when the
buffer is full (or the scheduler has replaced its contents: rows that joined, left, or
were trimmed) is it reallocated, with :data:`HEADROOM` spare positions.

``keys`` and ``values`` stay what transformers and the scheduler read and assign: reading
gives a view of the filled positions, assigning a tensor makes it the new contents. A buffer's
spare positions start as zeros, so a decode step's attention can multiply over the whole
buffer, its spare positions with zero weight (:func:`whole_buffer`, :mod:`.decode_attention`).

Rows come and go as requests finish and join (:meth:`GrowingLayer.keep`,
:meth:`GrowingLayer.merge`, what the scheduler calls). A layer's buffers are a window of larger
allocations with :data:`ROW_HEADROOM` spare rows: rows next to each other that remain (the
oldest requests finish first) stay where they are, the window narrowing, and a joining request
whose prompt is no longer than the running rows' cache is written into a spare row, the window
widening; anything else is one copy into new allocations. On the ~110M Llama in bfloat16, 16
callers joining one by one, in process: rows leaving took 0.6-0.7 ms a time (transformers'
selection, a trim and the next step's reallocation: 4.5-5.9 ms), joining 1.8-2.0 (4.0-5.7); 3% of
the decode loop's time against 10-15% (docs/benchmarks.md, tenth sitting).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

#: spare positions a buffer gets when it is (re)allocated: one reallocation per this many steps
HEADROOM = 32

#: spare rows an allocation gets: requests that join while others decode are written there, without a copy
ROW_HEADROOM = 8

#: the buffers GrowingLayer allocated, by address, while they live (what :func:`whole_buffer` finds)
_buffers: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose update writes into preallocated buffers instead of concatenating."""

    _kbuf: torch.Tensor | None  # the keys: a window of _kstore (or a tensor assigned from outside)
    _vbuf: torch.Tensor | None
    _kstore: torch.Tensor | None  # the allocations the windows are of, with spare rows and positions
    _vstore: torch.Tensor | None
    _row: int  # where the window starts in them
    _column: int
    _len: int  # filled positions of the keys' buffer
    _vlen: int  # and of the values' (the same, except between two assignments)

    @property
    def keys(self) -> torch.Tensor | None:
        buf = self.__dict__.get("_kbuf")
        return buf if buf is None or buf.dim() < 4 else buf[..., : self._len, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._kbuf, self._kstore = value, None
        self._len = 0 if value is None or value.dim() < 2 else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        buf = self.__dict__.get("_vbuf")
        return buf if buf is None or buf.dim() < 4 else buf[..., : self._vlen, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._vbuf, self._vstore = value, None
        self._vlen = 0 if value is None or value.dim() < 2 else value.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kbuf, vbuf = self._kbuf, self._vbuf
        length, step = self._len, key_states.shape[-2]
        need = length + step
        if (
            kbuf is None
            or vbuf is None
            or kbuf.dim() != 4
            or self._vlen != length
            or min(kbuf.shape[-2], vbuf.shape[-2]) < need
            or kbuf.shape[0] != key_states.shape[0]
        ):
            kbuf, vbuf = self._grow(key_states, value_states, need)
        kbuf[..., length:need, :] = key_states
        vbuf[..., length:need, :] = value_states
        self._len = self._vlen = need
        return kbuf[..., :need, :], vbuf[..., :need, :]

    def _stores(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The allocations the keys and values are a window of (None: tensors assigned from outside)."""
        kstore, vstore = self.__dict__.get("_kstore"), self.__dict__.get("_vstore")
        if kstore is None or vstore is None or self._len != self._vlen:
            return None
        return kstore, vstore

    def _window(self, kstore: torch.Tensor, vstore: torch.Tensor, row: int, rows: int, column: int, filled: int) -> None:
        """Make rows ``row`` to ``row + rows`` of the allocations, from position ``column`` on, the
        layer's keys and values (``filled`` positions of them)."""
        self._kstore, self._vstore, self._row, self._column = kstore, vstore, row, column
        self._kbuf = kstore[row : row + rows, :, column:, :]
        self._vbuf = vstore[row : row + rows, :, column:, :]
        self._len = self._vlen = filled
        if not torch.compiler.is_compiling():  # a compiled step keeps transformers' attention (and cannot trace weakrefs)
            _buffers[self._kbuf.data_ptr()] = self._kbuf
            _buffers[self._vbuf.data_ptr()] = self._vbuf

    def keep(self, rows: list[int], first: int) -> bool:
        """Keep ``rows`` (ascending indices) and the positions from ``first`` on; False (nothing
        done) where the keys and values are not both filled 4-D buffers. Rows next to each other
        (those that remain when the oldest or the newest requests finish) stay where they are: the
        layer's window of its allocations narrows, nothing is copied. Others are copied once, spare
        positions included (transformers' selection, a trim and the next step's reallocation copied
        them three times)."""
        kbuf, vbuf, stores = self._kbuf, self._vbuf, self._stores()
        if kbuf is None or vbuf is None or kbuf.dim() != 4 or vbuf.dim() != 4 or self._len != self._vlen:
            return False
        filled = self._len - first
        if stores is not None and rows and rows == list(range(rows[0], rows[0] + len(rows))):
            self._window(*stores, self._row + rows[0], len(rows), self._column + first, filled)
            return True
        index = torch.tensor(rows, dtype=torch.long, device=kbuf.device)
        kstore, vstore = (buf[..., first:, :].index_select(0, index) for buf in (kbuf, vbuf))
        self._window(kstore, vstore, 0, len(rows), 0, filled)
        return True

    def merge(self, other: Any, length: int, other_length: int) -> None:
        """These rows (``length`` positions), then ``other``'s (a layer with ``keys`` and ``values``,
        ``other_length`` positions), the shorter left-padded with zeros. Where the allocations have
        free rows after this window and ``other``'s prompt is no longer than these rows' cache,
        ``other``'s rows are written there and the window widens; else one copy of both into new
        allocations with :data:`HEADROOM` spare positions and :data:`ROW_HEADROOM` spare rows."""
        assert self.keys is not None and self.values is not None and other.keys is not None and other.values is not None
        rows, joining = self.keys.shape[0], other.keys.shape[0]
        stores = self._stores()
        if stores is not None and other_length <= length and self._row + rows + joining <= stores[0].shape[0]:
            kstore, vstore = stores
            end, column = self._row + rows, self._column
            for store, theirs in ((kstore, other.keys), (vstore, other.values)):
                part = store[end : end + joining, :, column:, :]
                part.zero_()  # left padding and spare positions: zeros (see whole_buffer)
                part[..., length - other_length : length, :] = theirs
            self._window(kstore, vstore, self._row, rows + joining, column, length)
            return
        width = max(length, other_length)
        allocated = []
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            store = mine.new_zeros((rows + joining + ROW_HEADROOM, *mine.shape[1:-2], width + HEADROOM, mine.shape[-1]))
            store[:rows, ..., width - length : width, :] = mine
            store[rows : rows + joining, ..., width - other_length : width, :] = theirs
            allocated.append(store)
        self._window(allocated[0], allocated[1], 0, rows + joining, 0, width)

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New allocations for ``need`` positions and :data:`HEADROOM` more (and :data:`ROW_HEADROOM`
        rows more), holding the filled ones."""
        stores = []
        rows = key_states.shape[0]
        kept = 0
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            store = torch.empty((rows + ROW_HEADROOM, *new.shape[1:-2], need + HEADROOM, new.shape[-1]), dtype=new.dtype, device=new.device)
            kept = 0
            if old is not None and old.dim() == 4 and self._len:
                kept = self._len
                store[:rows, ..., :kept, :] = old[..., :kept, :]
            store[:rows, ..., kept:, :].zero_()  # the rest zeros, never uninitialised memory (see whole_buffer)
            store[rows:].zero_()
            stores.append(store)
        self._window(stores[0], stores[1], 0, rows, 0, kept)
        assert self._kbuf is not None and self._vbuf is not None
        return self._kbuf, self._vbuf


def keep(layer: Any, rows: list[int], first: int) -> None:
    """Keep ``rows`` (ascending indices) of a cache layer and its positions from ``first`` on: a
    :class:`GrowingLayer` in place or in one copy (:meth:`GrowingLayer.keep`), any other layer by
    transformers' selection and a trim."""
    if isinstance(layer, GrowingLayer) and layer.keep(rows, first):
        return
    layer.batch_select_indices(torch.tensor(rows, dtype=torch.long, device=layer.keys.device))
    if first > 0:
        layer.keys = layer.keys[..., first:, :]
        layer.values = layer.values[..., first:, :]


def whole_buffer(view: torch.Tensor) -> torch.Tensor:
    """The whole buffer ``view`` is the filled positions of, when it is a :class:`GrowingLayer`
    buffer's as ``update`` hands them out ([rows, heads, filled, dim] -> [rows, heads,
    capacity, dim], the same strides); ``view`` itself otherwise. The positions past the filled ones
    hold zeros or values of the same layer's earlier steps, never uninitialised memory: a
    product over them with zero weights reads no NaN. (Found by address, not by ``view._base``:
    under ``torch.inference_mode``, where the decode loop runs, views keep no base.)"""
    buf = _buffers.get(view.data_ptr()) if view.numel() else None
    if buf is None or buf.data_ptr() != view.data_ptr() or buf.dtype != view.dtype or buf.device != view.device:
        return view
    if view.stride() != buf.stride() or view.shape[:2] != buf.shape[:2] or view.shape[3:] != buf.shape[3:]:
        return view
    return buf if view.shape[2] <= buf.shape[2] else view


def grow_in_place(cache: Any) -> None:
    """Turn the plain ``DynamicLayer`` layers of ``cache`` (as a prefill left them) into
    :class:`GrowingLayer`, keeping their contents; other layer types are left as they are."""
    for layer in getattr(cache, "layers", None) or []:
        if type(layer) is DynamicLayer:
            keys, values = layer.__dict__.pop("keys", None), layer.__dict__.pop("values", None)
            layer.__class__ = GrowingLayer
            layer.keys, layer.values = keys, values


def truncate(layers: Any, length: int) -> None:
    """Cut the KV cache ``layers`` that hold more than ``length`` positions back to their first
    ``length`` (what a failed forward pass appended is dropped before the step runs again)."""
    for layer in layers or ():
        if layer.get_seq_length() > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
