"""A preallocated key/value cache made of slots.

Each running request owns one slot: a row of `max_len` positions in every layer's key
and value tensors, shape (slots, kv_heads, max_len, head_dim). Slots rather than pages:
the shapes never change, so a decode step can always read whole fixed-size rows (which
keeps a request's numbers independent of its neighbours, and suits CUDA graphs later);
the cost is that a short request reserves a full row. One extra slot is a scratch row
that padding rows of a decode batch write into.
"""

from __future__ import annotations

import torch

from sliceserve.decoder_spec import DecoderSpec


class KVCache:
    def __init__(self, spec: DecoderSpec, *, slots: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, layers: int | None = None):
        shape = (slots + 1, spec.num_kv_heads, max_len, spec.head_dim)
        count = spec.num_layers if layers is None else layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(count)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(count)]
        self.slots, self.max_len = slots, max_len
        self.scratch_slot = slots

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
