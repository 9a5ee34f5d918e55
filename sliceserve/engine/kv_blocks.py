"""Which blocks of a paged KV cache each slot holds (model/kv_cache.py has the layout).

A slot grows by whole blocks as its request's tokens reach them; when a request ends, its
blocks go back to the pool. `grow` takes blocks only when all it needs are free, so a step
either fits or the scheduler preempts someone first. The table entries it changes are sent
to the device in one copy per step (`flush`). A reserved cache (no paging) always fits:
every slot owns max_len positions from the start.

Prefix caching: a full block of prefilled tokens is remembered by a hash of its tokens and of
every token before it; a later request whose prompt starts with the same blocks (a chat's
system prompt, say) holds those very blocks (shared, counted) instead of computing them. A
block no slot holds keeps its contents until the pool needs it (least recently released
first), so a prompt sent again after its request ended is found too. Shared blocks are never
written: a request shares at most the full blocks before its last prompt token.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from sliceserve.engine.served_model import ServedCache
from sliceserve.model.kv_cache import BLOCK_SIZE


def chained_hash(previous: bytes, tokens: list[int]) -> bytes:
    """The key of a block: its tokens and (through `previous`) all those before them. A
    cryptographic digest, so that no prompt can be made to collide with another's."""
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, cache: ServedCache, prefix_caching: bool = False):
        self.cache = cache
        self.paged = cache.paged
        self.prefix_caching = prefix_caching and self.paged
        self.block_size = cache.block_size
        self.total = cache.num_blocks - 1 if self.paged else cache.slots  # block 0 is scratch
        self.free = list(range(cache.num_blocks - 1, 0, -1)) if self.paged else []
        self.held: dict[int, list[int]] = {}  # slot -> its blocks, in position order
        self.pending: list[tuple[int, int, int]] = []  # (slot, index, block) not yet on the device
        self.refs: dict[int, int] = {}  # block -> how many slots hold it
        self.by_hash: dict[bytes, int] = {}  # a remembered block's key -> the block
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # remembered, held by no slot; oldest first
        self.hashed: dict[int, tuple[int, bytes]] = {}  # slot -> (its blocks remembered, the last key)

    @property
    def available(self) -> int:
        """Blocks a slot can take now: free ones, and remembered ones no slot holds."""
        return len(self.free) + len(self.evictable)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing(self, slot: int, tokens: int) -> int:
        """Blocks `slot` lacks to hold `tokens` positions."""
        if not self.paged:
            return 0
        return max(0, self.blocks_for(tokens) - len(self.held.get(slot, ())))

    def grow(self, slot: int, tokens: int) -> bool:
        """Give `slot` the blocks it lacks to hold `tokens` positions; False (taking none) when
        too few are available."""
        need = self.missing(slot, tokens)
        if need > self.available:
            return False
        self.held.setdefault(slot, [])  # a reserved cache counts the slots in use so
        for _ in range(need):
            self.hold(slot, self.take())
        return True

    def take(self) -> int:
        """A block to write: a free one, else the remembered one released longest ago (forgotten)."""
        if self.free:
            return self.free.pop()
        block, _ = self.evictable.popitem(last=False)
        del self.by_hash[self.hash_of.pop(block)]
        return block

    def hold(self, slot: int, block: int) -> None:
        held = self.held.setdefault(slot, [])
        self.pending.append((slot, len(held), block))
        held.append(block)
        self.refs[block] = self.refs.get(block, 0) + 1

    def release(self, slot: int) -> None:
        """Return `slot`'s blocks to the pool (its table row keeps stale entries: never read,
        since a slot's next request writes every position before it reads it)."""
        self.hashed.pop(slot, None)
        for block in reversed(self.held.pop(slot, [])):
            self.refs[block] -= 1
            if self.refs[block]:
                continue  # another slot shares it
            del self.refs[block]
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def share_prefix(self, slot: int, tokens: list[int]) -> int:
        """Hold the remembered blocks that begin `tokens` (for a slot holding none yet); returns
        how many positions they cover: whole blocks, never the one of the last token."""
        if not self.prefix_caching or self.held.get(slot):
            return 0
        key, shared = b"", 0
        for start in range(0, (len(tokens) - 1) // self.block_size * self.block_size, self.block_size):
            key = chained_hash(key, tokens[start : start + self.block_size])
            block = self.by_hash.get(key)
            if block is None:
                break
            self.evictable.pop(block, None)
            self.hold(slot, block)
            shared += 1
            self.hashed[slot] = (shared, key)
        return shared * self.block_size

    def remember(self, slot: int, tokens: list[int], written: int) -> None:
        """Remember the full blocks of `slot` among its first `written` positions (`tokens`
        being what they hold) for later requests to share."""
        if not self.prefix_caching:
            return
        done, key = self.hashed.get(slot, (0, b""))
        held = self.held.get(slot, [])
        full = min(written // self.block_size, len(held))
        for i in range(done, full):
            key = chained_hash(key, tokens[i * self.block_size : (i + 1) * self.block_size])
            if key not in self.by_hash and held[i] not in self.hash_of:
                self.by_hash[key], self.hash_of[held[i]] = held[i], key
        if full > done:
            self.hashed[slot] = (full, key)

    def flush(self) -> None:
        """Write this step's new table entries to the device."""
        if self.pending:
            self.cache.assign_blocks(self.pending)
            self.pending = []

    @property
    def used(self) -> int:
        """Blocks some slot holds (a shared one once)."""
        if not self.paged:
            return len(self.held)
        return self.total - self.available


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
