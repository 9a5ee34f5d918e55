"""Pipeline stages in one process on the fast path: the GPU counterpart of `PipelineModel`.

Each stage is a `FastStage` (runtime/stages.py): the fast path's per-layer code over the
stage's layer range, its KV cache on its device. Between stages the stream and its partial
sums of squares move to the next device, so every kernel sees exactly what it sees on one
device: the logits equal the single-device `FastTransformer`'s, bit for bit. On CUDA,
decode steps replay one graph per stage and batch bucket (runtime/pipeline_graphs.py).
`FastPipeline` offers the interface the engine uses on `FastTransformer`.
"""

from __future__ import annotations

import torch

from sliceserve.decoder_spec import DecoderSpec
from sliceserve.runtime.pipeline import PipelineCache
from sliceserve.runtime.stages import FastStage, Stream


def moved(stream: Stream, device: torch.device) -> Stream:
    return [t.to(device) for t in stream]


class FastPipeline:
    def __init__(self, stages: list[FastStage]):
        self.stages = stages
        self.devices = [stage.device for stage in stages]
        self.spec: DecoderSpec = stages[0].spec
        self.graphs = None  # PipelineDecodeGraphs, made on the first CUDA decode step

    @property
    def input_device(self) -> torch.device:
        return self.devices[0]

    @property
    def on_cuda(self) -> bool:
        return all(device.type == "cuda" for device in self.devices)

    def decode_rows(self, rows: int, max_batch: int) -> int:
        """The graph bucket that holds `rows` (as FastTransformer)."""
        bucket = 1
        while bucket < rows:
            bucket *= 2
        return min(bucket, max_batch)

    def new_cache(self, *, slots: int, max_len: int) -> PipelineCache:
        return PipelineCache([stage.new_cache(slots=slots, max_len=max_len) for stage in self.stages])

    def decode_graphs(self, cache: PipelineCache):
        from sliceserve.runtime.pipeline_graphs import PipelineDecodeGraphs

        if self.graphs is None or self.graphs.cache is not cache:
            self.graphs = PipelineDecodeGraphs(self, cache)
        return self.graphs

    def prepare(self, cache: PipelineCache) -> None:
        """Capture the decode graphs of every batch bucket for this cache (CUDA only)."""
        if self.on_cuda:
            self.decode_graphs(cache).capture_all()

    @torch.inference_mode()
    def forward_cached(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       cache: PipelineCache, last_only: bool = False) -> torch.Tensor:
        """As `FastTransformer.forward_cached`; the logits come out on the last stage's device."""
        if tokens.shape[1] == 1 and self.on_cuda:
            return self.decode_graphs(cache).run(tokens[:, 0], positions[:, 0], slots)[:, None]
        stream = self.stages[0].embed(tokens, positions)
        for stage, kv in zip(self.stages, cache.stages):
            device = stage.device
            stream = stage.advance(moved(stream, device), positions.to(device), slots.to(device), kv)
        return self.stages[-1].logits(stream, last_only)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T) at positions 0..T-1 (scratch caches)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        stream = self.stages[0].embed(tokens, positions)
        for stage in self.stages:
            stream = stage.advance(moved(stream, stage.device), positions.to(stage.device))
        return self.stages[-1].logits(stream)

    __call__ = forward
