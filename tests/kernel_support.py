"""Where kernel tests run: the GPU when there is one, else Triton's interpreter on the CPU."""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def poisoned(shape, dtype: torch.dtype) -> torch.Tensor:
    """NaN everywhere: an output a kernel fails to write shows."""
    return torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)


def randn(*shape, dtype, scale: float = 1.0, generator=None) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)
