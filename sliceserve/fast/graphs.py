"""Decode steps replayed from CUDA graphs: per batch bucket, one graph per stage.

A decode step of a 7B model launches a few hundred kernels; launched one by one from
Python, the host time exceeds the GPU time. Captured once per bucket (1, 2, 4, 8, 16, then
every multiple of 16 up to the cache's slots) and replayed, a step costs one launch per stage. A single-device model
is a pipeline of one stage. A CUDA graph belongs to one device, so a pipelined step is:
copy the rows' tokens, positions and slots in; replay stage 0's graph; copy its outputs
(the stream and its partial sums of squares) into stage 1's static inputs on the next GPU;
replay stage 1's graph; ... The cross-device copies are ordinary `copy_` calls, ordered
after the previous stage's work and before the next stage's. The KV cache is addressed in
place and every kernel reads the positions from device memory, so one graph serves every
step. Rows beyond the requests of a step are padding that writes into the scratch slot.
"""

from __future__ import annotations

import torch

from sliceserve.kernels.decode_attention import choose_splits
from sliceserve.model.kv_cache import KVCache

BUCKET_STEP = 16  # above this many rows, buckets are its multiples


def graph_bucket(rows: int, max_rows: int) -> int:
    """The captured batch size that holds `rows`: the next power of two up to BUCKET_STEP, the
    next multiple of it above (a batch of 40 runs 48 rows, not 64: while a burst of requests
    fills or drains the batch, padding rows would otherwise cost up to half the step), at
    most `max_rows`."""
    bucket = 1
    while bucket < min(rows, BUCKET_STEP):
        bucket *= 2
    if rows > BUCKET_STEP:
        bucket = -(-rows // BUCKET_STEP) * BUCKET_STEP
    return min(bucket, max_rows)


def captured(step, device: torch.device, pool, stream: torch.cuda.Stream):
    """(graph, outputs) of `step()` captured on `stream` into `pool`, after two runs on a side
    stream that compile its kernels and settle the allocator."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        outputs = step()
    return graph, outputs


class StageGraph:
    """One stage's part of a decode step of `rows` rows. `inputs`: the previous stage's
    outputs (None on the first stage, which embeds the tokens)."""

    def __init__(
        self,
        fast,
        cache: KVCache,
        rows: int,
        pool,
        capture_stream: torch.cuda.Stream,
        inputs: tuple[torch.Tensor, ...] | None,
        last: bool,
    ):
        device = self.device = fast.device
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), cache.scratch_slot, dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device) if inputs is None else None
        # Where the previous stage's outputs are copied to (zeros: the warm-up reads them).
        self.inputs = None if inputs is None else [torch.zeros(t.shape, dtype=t.dtype, device=device) for t in inputs]
        splits = choose_splits(rows, fast.spec.num_kv_heads)

        def step() -> tuple[torch.Tensor, ...]:
            if self.tokens is not None:
                x, px = fast.embed_rows(self.tokens, self.positions)
            else:
                x, px = self.inputs
            x, px = fast.run_layers(x, px, self.positions, self.slots, cache, splits=splits)
            return (fast.head_logits(x, px),) if last else (x, px)

        with torch.cuda.device(device):
            self.graph, self.outputs = captured(step, device, pool, capture_stream)

    def take(self, previous: StageGraph) -> None:
        """Copy the previous stage's outputs and the rows' positions and slots onto this device."""
        self.positions.copy_(previous.positions)
        self.slots.copy_(previous.slots)
        for static, produced in zip(self.inputs, previous.outputs):
            static.copy_(produced)


class DecodeGraph:
    """Every stage's graph for one bucket of rows."""

    def __init__(self, models: list, caches: list[KVCache], rows: int, pools: list, streams: list):
        self.rows, self.scratch_slot = rows, caches[0].scratch_slot
        self.parts: list[StageGraph] = []
        inputs = None
        for i, (model, cache) in enumerate(zip(models, caches)):
            part = StageGraph(model, cache, rows, pools[i], streams[i], inputs, last=i == len(models) - 1)
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


class DecodeGraphs:
    """The graphs of fast models (one per stage: `models[i]` over `caches[i]`), captured on
    first use of each bucket."""

    def __init__(self, models: list, caches: list[KVCache]):
        self.models, self.caches = models, caches
        self.pools = [torch.cuda.graph_pool_handle() for _ in models]
        self.streams = [torch.cuda.Stream(model.device) for model in models]  # one capture stream per GPU
        self.graphs: dict[int, DecodeGraph] = {}

    def serves(self, caches: list[KVCache]) -> bool:
        return len(caches) == len(self.caches) and all(a is b for a, b in zip(caches, self.caches))

    def graph(self, rows: int) -> DecodeGraph:
        bucket = graph_bucket(rows, self.caches[0].slots)
        if bucket not in self.graphs:
            self.graphs[bucket] = DecodeGraph(self.models, self.caches, bucket, self.pools, self.streams)
        return self.graphs[bucket]

    def capture_all(self) -> None:
        for bucket in sorted({graph_bucket(rows, self.caches[0].slots) for rows in range(1, self.caches[0].slots + 1)}):
            self.graph(bucket)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.graph(tokens.shape[0]).run(tokens, positions, slots)
