"""Pipeline stages in one process: contiguous layer ranges on several devices.

Each stage (parallel/stages.py) holds its layer range (the first also the embedding, the
last the head) and its KV cache on its own device; the activations move to the next device
between stages. Every stage runs the very operations a single-device model runs, so the
logits are the same, bit for bit, on the reference path and on the fast path alike. When
every stage is a fast one on a GPU, decode steps replay one CUDA graph per stage and batch
bucket (fast/graphs.py).
"""

from __future__ import annotations

import torch

from sliceserve.fast.graphs import DecodeGraphs, graph_bucket
from sliceserve.model.kv_cache import KVCache, PrefillChunk, prefill_each
from sliceserve.model.spec import DecoderSpec
from sliceserve.parallel.stages import FastStage, ReferenceStage, moved


class PipelineCache:
    """The stages' KV caches, each on its stage's device; `keys[i]` is layer i's, model-wide."""

    def __init__(self, stages: list[KVCache]):
        self.stages = stages
        self.keys = [k for cache in stages for k in cache.keys]
        self.values = [v for cache in stages for v in cache.values]
        first = stages[0]
        self.slots, self.max_len, self.scratch_slot = first.slots, first.max_len, first.scratch_slot
        self.paged, self.block_size, self.num_blocks = first.paged, first.block_size, first.num_blocks

    @property
    def bytes(self) -> int:
        return sum(cache.bytes for cache in self.stages)

    def assign_blocks(self, entries: list[tuple[int, int, int]]) -> None:
        """Every stage's table alike: a block number names the same positions on every stage."""
        for cache in self.stages:
            cache.assign_blocks(entries)


class Pipeline:
    def __init__(self, stages: list[ReferenceStage | FastStage]):
        self.stages = stages
        self.devices = [stage.device for stage in stages]
        self.spec: DecoderSpec = stages[0].spec
        self.fast = all(stage.fast for stage in stages)
        self.graphs: DecodeGraphs | None = None  # made on the first CUDA decode step

    @property
    def input_device(self) -> torch.device:
        return self.devices[0]

    @property
    def uses_graphs(self) -> bool:
        return self.fast and all(device.type == "cuda" for device in self.devices)

    def folds_decode_rows(self, rows: int) -> bool:
        """Never: prefill runs chunk by chunk through the stages."""
        return False

    def padded_decode_rows(self, rows: int, max_batch: int) -> int:
        """Fast stages: the graph bucket that holds `rows`. Reference stages: always max_batch,
        as the single-device reference model (a request's numbers never depend on its neighbours)."""
        return graph_bucket(rows, max_batch) if self.fast else max_batch

    def new_cache(self, *, slots: int, max_len: int, blocks: int | None = None) -> PipelineCache:
        return PipelineCache([stage.new_cache(slots=slots, max_len=max_len, blocks=blocks) for stage in self.stages])

    def decode_graphs(self, cache: PipelineCache) -> DecodeGraphs:
        if self.graphs is None or not self.graphs.serves(cache.stages):
            self.graphs = DecodeGraphs([stage.model for stage in self.stages], cache.stages)
        return self.graphs

    def close(self) -> None:
        """Nothing to release beyond the tensors."""

    def prepare(self, cache: PipelineCache) -> None:
        """Capture the decode graphs of every batch bucket for this cache (fast stages on GPUs)."""
        if self.uses_graphs:
            self.decode_graphs(cache).capture_all()

    @torch.inference_mode()
    def forward_cached(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: PipelineCache,
        last_only: bool = False,
    ) -> torch.Tensor:
        """As the single-device model's; the logits come out on the last stage's device."""
        if tokens.shape[1] == 1 and self.uses_graphs:
            return self.decode_graphs(cache).run(tokens[:, 0], positions[:, 0], slots)[:, None]
        activations = self.stages[0].embed(tokens, positions)
        for stage, kv in zip(self.stages, cache.stages):
            device = stage.device
            activations = stage.advance(moved(activations, device), positions.to(device), slots.to(device), kv)
        return self.stages[-1].logits(activations, last_only)

    def prefill(self, chunks: list[PrefillChunk], cache: PipelineCache) -> torch.Tensor:
        return prefill_each(self, chunks, cache)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T) at positions 0..T-1 (scratch caches)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        activations = self.stages[0].embed(tokens, positions)
        for stage in self.stages:
            activations = stage.advance(moved(activations, stage.device), positions.to(stage.device))
        return self.stages[-1].logits(activations)

    __call__ = forward
