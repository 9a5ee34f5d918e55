"""Which blocks of a paged KV cache each slot holds (model/kv_cache.py has the layout).

A slot grows by whole blocks as its request's tokens reach them; when a request ends, its
blocks go back to the pool. `grow` takes blocks only when all it needs are free, so a step
either fits or the scheduler preempts someone first. The table entries it changes are sent
to the device in one copy per step (`flush`). A reserved cache (no paging) always fits:
every slot owns max_len positions from the start.
"""

from __future__ import annotations

import torch

from sliceserve.engine.served_model import ServedCache
from sliceserve.model.kv_cache import BLOCK_SIZE


class BlockPool:
    def __init__(self, cache: ServedCache):
        self.cache = cache
        self.paged = cache.paged
        self.block_size = cache.block_size
        self.total = cache.num_blocks - 1 if self.paged else cache.slots  # block 0 is scratch
        self.free = list(range(cache.num_blocks - 1, 0, -1)) if self.paged else []
        self.held: dict[int, list[int]] = {}  # slot -> its blocks, in position order
        self.pending: list[tuple[int, int, int]] = []  # (slot, index, block) not yet on the device

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing(self, slot: int, tokens: int) -> int:
        """Blocks `slot` lacks to hold `tokens` positions."""
        if not self.paged:
            return 0
        return max(0, self.blocks_for(tokens) - len(self.held.get(slot, ())))

    def grow(self, slot: int, tokens: int) -> bool:
        """Give `slot` the blocks it lacks to hold `tokens` positions; False (taking none) when
        too few are free."""
        need = self.missing(slot, tokens)
        if need > len(self.free):
            return False
        held = self.held.setdefault(slot, [])
        for _ in range(need):
            block = self.free.pop()
            self.pending.append((slot, len(held), block))
            held.append(block)
        return True

    def release(self, slot: int) -> None:
        """Return `slot`'s blocks to the pool (its table row keeps stale entries: never read,
        since a slot's next request writes every position before it reads it)."""
        self.free.extend(reversed(self.held.pop(slot, [])))

    def flush(self) -> None:
        """Write this step's new table entries to the device."""
        if self.pending:
            self.cache.assign_blocks(self.pending)
            self.pending = []

    @property
    def used(self) -> int:
        if not self.paged:
            return len(self.held)
        return self.total - len(self.free)


def blocks_to_hold(model, *, max_batch: int, max_model_len: int, memory: int | None = None) -> int:
    """Blocks of a paged cache for `model`: what `memory` bytes hold when given; else enough for
    every slot at max_model_len, cut on a GPU to its free memory less a headroom for the
    steps' activations (max(2 GiB, 8% of the card))."""
    probe = model.new_cache(slots=1, max_len=BLOCK_SIZE, blocks=2)
    per_block = probe.bytes // 2
    del probe
    if memory is not None:
        return max(2, memory // per_block)
    wanted = max_batch * -(-max_model_len // BLOCK_SIZE) + 1
    device = model.input_device
    if device.type != "cuda":
        return wanted
    free, total = torch.cuda.mem_get_info(device)
    usable = free - max(2 << 30, int(0.08 * total))
    return max(2, min(wanted, usable // per_block))
