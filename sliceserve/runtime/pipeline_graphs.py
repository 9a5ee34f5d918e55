"""Decode steps of a fast-path pipeline replayed from CUDA graphs: per batch bucket, one
graph per stage, each captured on its stage's GPU.

A CUDA graph belongs to one device, so a step is: copy the rows' tokens, positions and
slots in; replay stage 0's graph; copy its outputs (the stream and its partial sums of
squares) into stage 1's static inputs on the next GPU; replay stage 1's graph; ... The
cross-device copies are ordinary `copy_` calls, which order themselves after the previous
stage's work and before the next stage's. As in decode_graphs.py, padding rows write into
the cache's scratch slot.
"""

from __future__ import annotations

import torch

from sliceserve.kernels.decode_attention import choose_splits
from sliceserve.runtime.kv_cache import KVCache


class StageGraph:
    """One stage's part of a decode step of `rows` rows."""

    def __init__(self, stage, cache: KVCache, rows: int, pool, capture_stream: torch.cuda.Stream,
                 inputs: tuple[torch.Tensor, ...] | None, last: bool):
        fast, device = stage.model, stage.device
        self.device = device
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), cache.scratch_slot, dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device) if inputs is None else None
        # Where the previous stage's outputs are copied to (zeros: the warm-up reads them).
        self.inputs = None if inputs is None else [torch.zeros(t.shape, dtype=t.dtype, device=device) for t in inputs]
        splits = choose_splits(rows, stage.spec.num_kv_heads)

        def step() -> tuple[torch.Tensor, ...]:
            if self.tokens is not None:
                x, px = fast.embed_rows(self.tokens, self.positions)
            else:
                x, px = self.inputs
            x, px = fast.run_layers(x, px, self.positions, self.slots, cache, decode=True, splits=splits)
            return (fast.head_logits(x, px),) if last else (x, px)

        with torch.cuda.device(device):
            # Warm up on a side stream (compiles the kernels, settles the allocator), then capture.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=capture_stream):
                self.outputs = step()

    def take(self, previous: StageGraph) -> None:
        """Copy the previous stage's outputs and the rows' positions and slots onto this device."""
        self.positions.copy_(previous.positions)
        self.slots.copy_(previous.slots)
        for static, produced in zip(self.inputs, previous.outputs):
            static.copy_(produced)


class PipelineDecodeGraph:
    """Every stage's graph for one bucket of rows."""

    def __init__(self, stages: list, caches: list[KVCache], rows: int, pools: list, streams: list):
        self.rows, self.scratch_slot = rows, caches[0].scratch_slot
        self.parts: list[StageGraph] = []
        inputs = None
        for i, (stage, cache) in enumerate(zip(stages, caches)):
            part = StageGraph(stage, cache, rows, pools[i], streams[i], inputs, last=i == len(stages) - 1)
            self.parts.append(part)
            inputs = part.outputs

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        n, first = tokens.shape[0], self.parts[0]
        first.tokens[:n].copy_(tokens)
        first.positions[:n].copy_(positions)
        first.slots[:n].copy_(slots)
        if n < self.rows:  # padding rows: scratch slot, position 0
            first.tokens[n:].zero_()
            first.positions[n:].zero_()
            first.slots[n:].fill_(self.scratch_slot)
        previous = None
        for part in self.parts:
            with torch.cuda.device(part.device):
                if previous is not None:
                    part.take(previous)
                part.graph.replay()
            previous = part
        return self.parts[-1].outputs[0][:n].clone()


class PipelineDecodeGraphs:
    """The graphs of one pipeline over one cache, captured on first use of each bucket."""

    def __init__(self, pipeline, cache):
        self.pipeline, self.cache = pipeline, cache
        self.pools = [torch.cuda.graph_pool_handle() for _ in pipeline.stages]
        self.streams = [torch.cuda.Stream(stage.device) for stage in pipeline.stages]  # one capture stream per GPU
        self.graphs: dict[int, PipelineDecodeGraph] = {}

    def graph(self, rows: int) -> PipelineDecodeGraph:
        bucket = self.pipeline.decode_rows(rows, self.cache.slots)
        if bucket not in self.graphs:
            self.graphs[bucket] = PipelineDecodeGraph(self.pipeline.stages, self.cache.stages, bucket, self.pools,
                                                      self.streams)
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
