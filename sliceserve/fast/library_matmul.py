"""The fast path's products through the vendor library (cuBLAS) instead of our Triton kernels.

Same functions and signatures as kernels.fused_linear / kernels.gated_linear, computed in
the model's dtype with library matrix products and the epilogue as separate element-wise
operations (inside CUDA graphs those cost GPU time, not launch overhead). The benchmark
times both in one run; whichever reads or multiplies faster on a given GPU and size is the
one to use (FastTransformer's `products` option).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sliceserve.kernels.activations import reference_activation
from sliceserve.kernels.fused_linear import row_scale_reference


def library_linear(
    a: torch.Tensor,
    w: torch.Tensor,
    *,
    a2=None,
    w2=None,
    bias=None,
    residual=None,
    norm=None,
    activation: str = "none",
    sumsq: bool = False,
    out=None,
    tiles=None,
):
    acc = F.linear(a, w)
    if norm is not None:
        acc = acc * row_scale_reference(*norm).to(acc.dtype)
    if a2 is not None:
        acc = torch.addmm(acc, a2, w2.T)
    if bias is not None:
        acc = acc + bias
    acc = reference_activation(acc, activation)
    if residual is not None:
        acc = acc + residual
    return acc, (acc.float().pow(2).sum(-1, keepdim=True) if sumsq else None)


def library_gated(
    a: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    activation: str = "silu",
    gate_bias=None,
    up_bias=None,
    norm=None,
    out=None,
    tiles=None,
) -> torch.Tensor:
    if norm is not None:  # scale the input, not the products, so that the biases stay unscaled
        a = a * row_scale_reference(*norm).to(a.dtype)
    return reference_activation(F.linear(a, gate, gate_bias), activation) * F.linear(a, up, up_bias)
