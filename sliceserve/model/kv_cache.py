"""The key/value cache: fixed-size blocks of positions, and a block table per slot.

Each running request owns a slot: a row of the block table, naming the cache block that
holds each run of `block_size` of its positions. A token of slot s at position p lives at
keys[layer][table[s, p // block_size], :, p % block_size]. Two layouts share that address:
- paged (`blocks` given): a pool of small blocks (16 positions) handed out by the engine as
  requests grow (engine/kv_blocks.py), so capacity follows the tokens held, not
  max_len per request; block 0 is scratch, where unassigned entries and padding rows point;
- reserved (`blocks` None): one block of `max_len` positions per slot, assigned once
  (table[s, 0] = s): every slot can always hold `max_len` tokens, as multi-process
  pipelines need (their workers never see the engine's table).
The shapes never change, so a CUDA graph captured once serves every step: the kernels read
positions and the table from device memory. One extra slot is a scratch row that padding
rows of a decode batch write into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sliceserve.model.spec import DecoderSpec
from sliceserve.uploads import upload


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


BLOCK_SIZE = 16  # positions per block of a paged cache


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
        blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
    ):
        """blocks: the number of paged blocks of `block_size` positions (block 0, scratch, among
        them); None reserves `max_len` positions for every slot."""
        self.paged = blocks is not None
        if self.paged and blocks < 2:
            raise ValueError("a paged cache needs at least 2 blocks (block 0 is scratch)")
        self.block_size = block_size if self.paged else max_len
        self.num_blocks = blocks if self.paged else slots + 1
        shape = (self.num_blocks, spec.num_kv_heads, self.block_size, spec.head_dim)
        count = spec.num_layers if layers is None else layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(count)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(count)]
        self.slots, self.max_len = slots, max_len
        self.scratch_slot = slots
        self.blocks_per_slot = -(-max_len // self.block_size)
        if self.paged:  # every entry on the scratch block until the engine assigns one
            table = torch.zeros((slots + 1, self.blocks_per_slot), dtype=torch.int32)
        else:
            table = torch.arange(slots + 1, dtype=torch.int32)[:, None]
        self.block_table = table.to(device)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def assign_blocks(self, entries: list[tuple[int, int, int]]) -> None:
        """Point table[slot, index] at `block` for every (slot, index, block): one copy to the
        device, ordered on its stream before the next step that reads the table."""
        if entries:
            slots, indices, blocks = zip(*entries)
            device = self.block_table.device
            where = upload([slots, indices], device)
            self.block_table.index_put_(tuple(where), upload(blocks, device, torch.int32))

    def addresses(self, slot: int, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks, offsets) of positions first..last of `slot`: where those keys live."""
        positions = torch.arange(first, last + 1, device=self.block_table.device)
        return self.block_table[slot, positions // self.block_size].long(), positions % self.block_size
