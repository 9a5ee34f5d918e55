"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a 7B model launches a few hundred kernels; launched one by one from
Python, the host time exceeds the GPU time. Captured once per bucket (1, 2, 4, ... up to
the cache's slots) and replayed, the step costs one launch. Inputs are copied into the
graph's static tensors; the KV cache is addressed in place, and every kernel reads the
positions from device memory, so one graph serves every step. Rows beyond the requests
of a step are padding that writes into the cache's scratch slot.
"""

from __future__ import annotations

import torch

from sliceserve.kernels.decode_attention import choose_splits
from sliceserve.runtime.kv_cache import KVCache


class DecodeGraph:
    def __init__(self, model, cache: KVCache, rows: int, pool):
        device = model.input_device
        self.rows, self.scratch_slot = rows, cache.scratch_slot
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), cache.scratch_slot, dtype=torch.long, device=device)
        splits = choose_splits(rows, model.spec.num_kv_heads)

        def step() -> torch.Tensor:
            return model.step(self.tokens, self.positions, self.slots, cache, decode=True, splits=splits)

        # Warm up on a side stream (compiles the kernels, settles the allocator), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = step()

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        if n < self.rows:  # padding rows: scratch slot, position 0
            self.tokens[n:].zero_()
            self.positions[n:].zero_()
            self.slots[n:].fill_(self.scratch_slot)
        self.graph.replay()
        return self.logits[:n].clone()


class DecodeGraphs:
    """The graphs of one model over one KV cache, captured on first use of each bucket."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, DecodeGraph] = {}

    def bucket(self, rows: int) -> int:
        return self.model.decode_rows(rows, self.cache.slots)

    def graph(self, rows: int) -> DecodeGraph:
        bucket = self.bucket(rows)
        if bucket not in self.graphs:
            self.graphs[bucket] = DecodeGraph(self.model, self.cache, bucket, self.pool)
        return self.graphs[bucket]

    def capture_all(self) -> None:
        rows = 1
        while True:
            self.graph(rows)
            if rows >= self.cache.slots:
                return
            rows = min(rows * 2, self.cache.slots)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.graph(tokens.shape[0]).run(tokens, positions, slots)
