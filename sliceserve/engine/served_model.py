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
    slots: int
    max_len: int
    scratch_slot: int

    @property
    def bytes(self) -> int: ...


class ServedModel(Protocol):
    spec: DecoderSpec

    @property
    def input_device(self) -> torch.device:
        """Where token ids and positions go in."""

    def new_cache(self, *, slots: int, max_len: int) -> ServedCache:
        """An empty KV cache of `slots` rows of `max_len` positions (plus a scratch row)."""

    def prepare(self, cache: ServedCache) -> None:
        """Work to do once before serving from `cache` (the fast path captures its CUDA graphs)."""

    def padded_decode_rows(self, rows: int, max_batch: int) -> int:
        """How many rows a decode step of `rows` requests is padded to."""

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
