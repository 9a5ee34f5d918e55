"""What the engine needs of a model: the interface every served model offers.

The reference decoder (model/decoder.py), the fast path (fast/model.py), the pipelines in
one process (parallel/pipeline.py) and over several (parallel/front.py) all satisfy it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sliceserve.model.kv_cache import PrefillChunk
from sliceserve.model.spec import DecoderSpec


class ServedCache(Protocol):
    """model/kv_cache.py's KVCache, or the stages' caches behind one face."""

    slots: int
    max_len: int
    scratch_slot: int
    paged: bool  # blocks handed out by the engine; else max_len positions reserved per slot
    block_size: int
    num_blocks: int

    @property
    def bytes(self) -> int: ...

    def assign_blocks(self, entries: list[tuple[int, int, int]]) -> None:
        """Point block-table entries (slot, index) at blocks (paged caches only)."""


class ServedModel(Protocol):
    spec: DecoderSpec

    @property
    def input_device(self) -> torch.device:
        """Where token ids and positions go in."""

    def new_cache(self, *, slots: int, max_len: int, blocks: int | None = None) -> ServedCache:
        """An empty KV cache for `slots` requests of up to `max_len` positions (plus a scratch
        slot): paged in `blocks` blocks where given and the model can page, else reserved."""

    def prepare(self, cache: ServedCache) -> None:
        """Work to do once before serving from `cache` (the fast path captures its CUDA graphs)."""

    def padded_decode_rows(self, rows: int, max_batch: int) -> int:
        """How many rows a decode step of `rows` requests is padded to."""

    def folds_decode_rows(self, rows: int) -> bool:
        """Whether a step's `rows` decode rows go into its prefill forward (as one-token chunks)
        rather than into a decode step of their own: one pass over the weights instead of two,
        where the decode rows' numbers then depend on the prefill beside them."""

    def forward_cached(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: ServedCache,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for tokens (B, T) at positions (B, T), row b in cache slot slots[b]."""

    def prefill(self, chunks: list[PrefillChunk], cache: ServedCache) -> torch.Tensor:
        """Logits (sum of chunk.logit_rows, vocab), in chunk order: each prompt chunk's last
        position, or every position of a chunk with all_positions (prompt scoring); its keys
        and values written into its slot. Only the rows asked for are computed by the head."""

    def close(self) -> None:
        """Release what the model holds beyond its tensors (a distributed front stops its ranks)."""
