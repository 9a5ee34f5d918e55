"""Which path runs a checkpoint: the fast path (Triton kernels, CUDA graphs) or the reference
model, and whether a 2:4 checkpoint uses the GPU's sparse tensor cores. Imports no kernel, so
the reference path runs where Triton is absent."""

from __future__ import annotations

from pathlib import Path

import torch

from sliceserve.checkpoint import read_config
from sliceserve.errors import SliceserveError


def supports_semi_structured(device: torch.device) -> bool:
    """Sparse tensor cores: CUDA compute capability 8.0 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def uses_sparse_tensor_cores(path: str | Path, device: str | torch.device) -> bool:
    """A 2:4-pruned checkpoint on a GPU with sparse tensor cores (else its zeros run dense)."""

    pattern = (read_config(path).get("sparsity") or {}).get("pattern")
    return pattern == "2:4" and supports_semi_structured(torch.device(device))


def use_fast_path(runtime: str, device: str | torch.device) -> bool:
    on_cuda = torch.device(device).type == "cuda"
    if runtime not in ("auto", "fast", "reference"):
        raise SliceserveError(f"unknown runtime {runtime!r}: auto, fast or reference")
    if runtime == "fast" and not on_cuda:
        raise SliceserveError(
            "the fast runtime needs a CUDA device (on a CPU its Triton kernels only run "
            "interpreted, for tests); use --runtime reference or auto"
        )
    return runtime == "fast" or (runtime == "auto" and on_cuda)
