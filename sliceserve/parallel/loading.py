"""A checkpoint's layers read stage by stage onto their devices, into a `Pipeline`."""

from __future__ import annotations

from pathlib import Path

import torch

from sliceserve.checkpoint import Checkpoint, checkpoint_spec, open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.fast.selection import use_fast_path, uses_sparse_tensor_cores
from sliceserve.model.decoder import Transformer
from sliceserve.model.spec import DecoderSpec
from sliceserve.parallel.pipeline import Pipeline
from sliceserve.parallel.stages import make_stage


def stage_getter(
    checkpoint: Checkpoint, layers: range, *, first: bool, last: bool, device: torch.device, dtype: torch.dtype | None
):
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


def build_stage(
    checkpoint: Checkpoint,
    spec: DecoderSpec,
    layers: range,
    *,
    first: bool,
    last: bool,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Transformer:
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


def load_pipeline(
    path: str | Path,
    devices: list[str | torch.device],
    ranges: list[range],
    *,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    runtime: str = "auto",
):
    """A checkpoint's layers split over `devices`, `ranges[i]` on `devices[i]`: a `Pipeline`
    of fast stages when every device is a GPU (runtime "auto" or "fast"), else of reference stages."""
    if len(devices) != len(ranges):
        raise SliceserveError(f"{len(devices)} devices for {len(ranges)} stages")
    devices = [torch.device(d) for d in devices]
    fast = all([use_fast_path(runtime, device) for device in devices])
    checkpoint = open_checkpoint(path, verify=verify)
    spec = checkpoint_spec(checkpoint.config)
    check_ranges(ranges, spec.num_layers)
    last = len(ranges) - 1
    built = (
        build_stage(checkpoint, spec, layers, first=i == 0, last=i == last, device=device, dtype=dtype)
        for i, (device, layers) in enumerate(zip(devices, ranges))
    )
    semi_structured = fast and uses_sparse_tensor_cores(path, devices[0])
    # One stage at a time: each reference stage is dropped once wrapped (its q, k, v are copied).
    return Pipeline(
        [make_stage(stage, device, fast=fast, semi_structured=semi_structured) for stage, device in zip(built, devices)]
    )
