"""Pipeline stages in one process: contiguous layer ranges on several devices.

Each stage is an ordinary `Transformer` built over its own layer range (the first also
holds the embedding, the last the head), with its KV cache on its own device; the stream
moves to the next device between stages. Every stage runs the very modules and the very
operations a single-device model runs, so the logits are the same, bit for bit.
`PipelineModel` offers the interface the engine uses on `Transformer`. On GPUs,
`load_pipeline` returns the fast path's counterpart instead (runtime/fast_pipeline.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sliceserve.checkpoint import Checkpoint, open_checkpoint
from sliceserve.decoder_spec import DecoderSpec
from sliceserve.errors import SliceserveError
from sliceserve.runtime.kv_cache import KVCache
from sliceserve.runtime.loader import checkpoint_spec
from sliceserve.runtime.model import CacheView, Transformer

Rows = list[tuple[int, int, int]]  # (slot, first position, last position) per row, as CacheView takes


def cache_rows(slots: torch.Tensor, positions: torch.Tensor) -> Rows:
    return [(s, p[0], p[-1]) for s, p in zip(slots.tolist(), positions.tolist())]


def run_blocks(stage: Transformer, x: torch.Tensor, positions: torch.Tensor, rows: Rows | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
    """The stream after a stage's blocks (with its KV cache when given), as `Transformer` runs them."""
    rope = stage.rope_for(positions, x.dtype)
    for i, block in enumerate(stage.layers):
        x = block(x, rope, None if cache is None else CacheView(cache.keys[i], cache.values[i], rows))
    return x


def stage_cache(stage: Transformer, device: torch.device, *, slots: int, max_len: int) -> KVCache:
    dtype = next(stage.parameters()).dtype
    return KVCache(stage.spec, slots=slots, max_len=max_len, device=device, dtype=dtype, layers=len(stage.layers))


class PipelineCache:
    """The stages' KV caches, each on its stage's device; `keys[i]` is layer i's, model-wide."""

    def __init__(self, stages: list[KVCache]):
        self.stages = stages
        self.keys = [k for cache in stages for k in cache.keys]
        self.values = [v for cache in stages for v in cache.values]
        self.slots, self.max_len, self.scratch_slot = stages[0].slots, stages[0].max_len, stages[0].scratch_slot

    @property
    def bytes(self) -> int:
        return sum(cache.bytes for cache in self.stages)


class PipelineModel(nn.Module):
    def __init__(self, stages: list[Transformer], devices: list[torch.device]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.devices = devices
        self.spec: DecoderSpec = stages[0].spec

    @property
    def input_device(self) -> torch.device:
        return self.devices[0]

    @property
    def head(self) -> nn.Linear:
        return self.stages[-1].head

    def decode_rows(self, rows: int, max_batch: int) -> int:
        return max_batch  # fixed shapes, as Transformer: a request's numbers never depend on its neighbours

    def new_cache(self, *, slots: int, max_len: int) -> PipelineCache:
        return PipelineCache([stage_cache(stage, device, slots=slots, max_len=max_len)
                              for stage, device in zip(self.stages, self.devices)])

    def forward_cached(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       cache: PipelineCache, last_only: bool = False) -> torch.Tensor:
        """As `Transformer.forward_cached`; the logits come out on the last stage's device."""
        rows = cache_rows(slots, positions)
        x = self.stages[0].embed_tokens(tokens, positions)
        for stage, device, kv in zip(self.stages, self.devices, cache.stages):
            x = run_blocks(stage, x.to(device), positions.to(device), rows, kv)
        return self.stages[-1].final_logits(x[:, -1:] if last_only else x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.stages[0].embed_tokens(tokens, positions)
        for stage, device in zip(self.stages, self.devices):
            x = run_blocks(stage, x.to(device), positions.to(device))
        return self.stages[-1].final_logits(x)


def stage_getter(checkpoint: Checkpoint, layers: range, *, first: bool, last: bool,
                 device: torch.device, dtype: torch.dtype | None):
    """Reads only the tensors of one stage, onto its device."""

    def belongs(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in layers
        if name.startswith(("embed.", "positions.")):
            return first
        return last if name.startswith("head.") else False

    def get(name: str) -> torch.Tensor | None:
        if not belongs(name) or not checkpoint.has(name):
            return None
        tensor = checkpoint.tensor(name, device)
        return tensor if dtype is None else tensor.to(dtype)

    return get


def build_stage(checkpoint: Checkpoint, spec: DecoderSpec, layers: range, *, first: bool, last: bool,
                device: torch.device, dtype: torch.dtype | None = None) -> Transformer:
    get = stage_getter(checkpoint, layers, first=first, last=last, device=device, dtype=dtype)
    return Transformer(spec, get, layers).eval()


def check_ranges(ranges: list[range], num_layers: int) -> None:
    """Contiguous, non-empty, covering every layer once."""
    expected = 0
    for r in ranges:
        if r.start != expected or len(r) < 1 or r.step != 1:
            raise SliceserveError(f"stage layer ranges must be contiguous and cover 0..{num_layers - 1}: got {ranges}")
        expected = r.stop
    if expected != num_layers:
        raise SliceserveError(f"stage layer ranges must cover 0..{num_layers - 1}: got {ranges}")


def load_pipeline(path: str | Path, devices: list[str | torch.device], ranges: list[range], *,
                  dtype: torch.dtype | None = None, verify: bool = True, runtime: str = "auto"):
    """A checkpoint's layers split over `devices`, `ranges[i]` on `devices[i]`: a `FastPipeline`
    (runtime/fast_pipeline.py) when every device is a GPU (runtime "auto" or "fast"), else a
    `PipelineModel` of reference stages."""
    from sliceserve.runtime.engine import use_fast_path, uses_sparse_tensor_cores

    if len(devices) != len(ranges):
        raise SliceserveError(f"{len(devices)} devices for {len(ranges)} stages")
    devices = [torch.device(d) for d in devices]
    fast = all([use_fast_path(runtime, device) for device in devices])
    checkpoint = open_checkpoint(path, verify=verify)
    spec = checkpoint_spec(checkpoint.config)
    check_ranges(ranges, spec.num_layers)
    last = len(ranges) - 1
    built = (build_stage(checkpoint, spec, layers, first=i == 0, last=i == last, device=device, dtype=dtype)
             for i, (device, layers) in enumerate(zip(devices, ranges)))
    if not fast:
        return PipelineModel(list(built), devices).eval()
    from sliceserve.runtime.fast_pipeline import FastPipeline
    from sliceserve.runtime.stages import FastStage

    semi_structured = uses_sparse_tensor_cores(path, devices[0])
    # One stage at a time: each reference stage is dropped once wrapped (its q, k, v are copied).
    return FastPipeline([FastStage(stage, device, semi_structured=semi_structured)
                         for stage, device in zip(built, devices)])
