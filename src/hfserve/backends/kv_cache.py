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
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

#: spare positions a buffer gets when it is (re)allocated: one reallocation per this many steps
HEADROOM = 32

#: the buffers GrowingLayer allocated, by address, while they live (what :func:`whole_buffer` finds)
_buffers: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose update writes into preallocated buffers instead of concatenating."""

    _kbuf: torch.Tensor | None
    _vbuf: torch.Tensor | None
    _len: int  # filled positions of the keys' buffer
    _vlen: int  # and of the values' (the same, except between two assignments)

    @property
    def keys(self) -> torch.Tensor | None:
        buf = self.__dict__.get("_kbuf")
        return buf if buf is None or buf.dim() < 4 else buf[..., : self._len, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._kbuf = value
        self._len = 0 if value is None or value.dim() < 2 else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        buf = self.__dict__.get("_vbuf")
        return buf if buf is None or buf.dim() < 4 else buf[..., : self._vlen, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._vbuf = value
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

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keep(indices, 0)

    def keep(self, rows: torch.Tensor, first: int) -> None:
        """Keep ``rows`` (indices) and the positions from ``first`` on: one copy into buffers that
        keep the spare positions these had (transformers' selection, then a trim, then the next
        step's reallocation copied them three times)."""
        kbuf, vbuf = self._kbuf, self._vbuf
        if kbuf is None or vbuf is None or kbuf.dim() != 4 or vbuf.dim() != 4 or self._len != self._vlen:
            super().batch_select_indices(rows)  # through the keys/values properties
            if first:
                self.keys, self.values = self.keys[..., first:, :], self.values[..., first:, :]  # type: ignore[index]
            return
        filled = self._len - first
        self._kbuf, self._vbuf = (buf[..., first:, :].index_select(0, rows) for buf in (kbuf, vbuf))
        self._len = self._vlen = filled
        self._remember()

    def merge(self, other: Any, length: int, other_length: int) -> None:
        """These rows (``length`` positions), then ``other``'s (a layer with ``keys`` and ``values``,
        ``other_length`` positions), the shorter left-padded with zeros: one copy each into new
        buffers with :data:`HEADROOM` spare positions (padding, concatenating and the next step's
        reallocation copied them three times)."""
        width = max(length, other_length)
        bufs = []
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            assert mine is not None and theirs is not None
            rows = mine.shape[0]
            buf = mine.new_zeros((rows + theirs.shape[0], *mine.shape[1:-2], width + HEADROOM, mine.shape[-1]))
            buf[:rows, ..., width - length : width, :] = mine
            buf[rows:, ..., width - other_length : width, :] = theirs
            bufs.append(buf)
        self._kbuf, self._vbuf = bufs
        self._len = self._vlen = width
        self._remember()

    def _remember(self) -> None:
        if not torch.compiler.is_compiling():  # a compiled step keeps transformers' attention (and cannot trace weakrefs)
            for buf in (self._kbuf, self._vbuf):
                if buf is not None:
                    _buffers[buf.data_ptr()] = buf

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New buffers for ``need`` positions and :data:`HEADROOM` more, holding the filled ones."""
        bufs = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            shape = (*new.shape[:-2], need + HEADROOM, new.shape[-1])
            buf = torch.empty(shape, dtype=new.dtype, device=new.device)
            kept = 0
            if old is not None and old.dim() == 4 and self._len:
                kept = self._len
                buf[..., :kept, :] = old[..., :kept, :]
            buf[..., kept:, :].zero_()  # the rest zeros, never uninitialised memory (see whole_buffer)
            bufs.append(buf)
        self._kbuf, self._vbuf = bufs
        self._remember()
        return bufs[0], bufs[1]


def whole_buffer(view: torch.Tensor) -> torch.Tensor:
    """The whole buffer ``view`` is the filled positions of, when it is a :class:`GrowingLayer`
    buffer's as ``update`` hands them out ([rows, heads, filled, dim] -> [rows, heads,
    capacity, dim], contiguous); ``view`` itself otherwise. The positions past the filled ones
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
