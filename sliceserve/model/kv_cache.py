"""A preallocated key/value cache made of slots.

Each running request owns one slot: a row of `max_len` positions in every layer's key
and value tensors, shape (slots, kv_heads, max_len, head_dim). Slots rather than pages:
the shapes never change, so a decode step can always read whole fixed-size rows (which
keeps a request's numbers independent of its neighbours, and suits CUDA graphs later);
the cost is that a short request reserves a full row. One extra slot is a scratch row
that padding rows of a decode batch write into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sliceserve.model.spec import DecoderSpec


@dataclass
class PrefillChunk:
    """Prompt tokens `tokens` of one request, at positions start.., into its cache slot.

    all_positions: the logits of every position are wanted (prompt scoring), not only the last.
    """

    tokens: list[int]
    start: int
    slot: int
    all_positions: bool = False

    @property
    def logit_rows(self) -> int:
        """Rows of logits a prefill returns for this chunk."""
        return len(self.tokens) if self.all_positions else 1


def prefill_each(model, chunks: list[PrefillChunk], cache) -> torch.Tensor:
    """Logits (sum of logit_rows, vocab): each chunk's last position, or all its positions
    where it asks, in chunk order; one forward per chunk: the way for models whose numbers
    must not depend on what is prefilled beside them."""
    device = model.input_device
    rows = []
    for chunk in chunks:
        tokens = torch.tensor([chunk.tokens], device=device)
        positions = torch.arange(chunk.start, chunk.start + len(chunk.tokens), device=device)[None]
        slots = torch.tensor([chunk.slot], device=device)
        logits = model.forward_cached(tokens, positions, slots, cache, last_only=not chunk.all_positions)
        rows.append(logits[0])
    return torch.cat(rows)


class KVCache:
    def __init__(
        self,
        spec: DecoderSpec,
        *,
        slots: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        layers: int | None = None,
    ):
        shape = (slots + 1, spec.num_kv_heads, max_len, spec.head_dim)
        count = spec.num_layers if layers is None else layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(count)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(count)]
        self.slots, self.max_len = slots, max_len
        self.scratch_slot = slots

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
