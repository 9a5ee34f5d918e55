"""The PyTorch references of the two operations that the reference model runs and the
kernels fuse: the weightless RMSNorm and the activations. Kept free of Triton so that the
reference model imports where Triton is absent; the kernels' tests compare against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, original_width: int, eps: float, *, sumsq_only: bool = False) -> torch.Tensor:
    """Weightless RMSNorm whose mean runs over the original width, even when x is sliced.
    Half precision is computed in float32, float64 stays float64 (exact sparsity-0 checks)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    sumsq = xf.pow(2).sum(-1, keepdim=True)
    if sumsq_only:
        return sumsq
    return (xf * torch.rsqrt(sumsq / original_width + eps)).to(x.dtype)


def reference_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "none":
        return x
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")
