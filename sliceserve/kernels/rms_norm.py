"""Weightless RMSNorm whose mean runs over the model's original width.

A sliced residual stream keeps only its leading principal components, but the norm must
still divide by the original width: the deleted coordinates were (nearly) zero, so the
sum of squares is the same and only the count differs. One program per row; the row is
loaded once. `rms_norm(..., sumsq_only=True)` returns the row's sum of squares as a
single partial column instead, the form the fused kernels consume.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sliceserve.kernels.launch import launch_options, overlap_mode, wait_for_previous_kernel
from sliceserve.kernels.reference import rms_norm_reference  # noqa: F401  (the kernel's reference)


@triton.jit
def rms_norm_kernel(
    x_ptr,
    out_ptr,
    sumsq_ptr,
    stride_x,
    stride_out,
    width,
    original_width,
    eps,
    SUMSQ_ONLY: tl.constexpr,
    BLOCK: tl.constexpr,
    OVERLAP: tl.constexpr,
):
    wait_for_previous_kernel(OVERLAP)
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    ok = i < width
    x = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0).to(tl.float32)
    sumsq = tl.sum(x * x, axis=0)
    if SUMSQ_ONLY:
        tl.store(sumsq_ptr + row, sumsq)
    else:
        scale = 1.0 / tl.sqrt(sumsq / original_width + eps)
        tl.store(out_ptr + row * stride_out + i, (x * scale).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, original_width: int, eps: float, *, sumsq_only: bool = False) -> torch.Tensor:
    """x (M, width) -> normalised x (M, width), or its sums of squares (M, 1) in float32."""
    M, width = x.shape
    if sumsq_only:
        out = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty_like(x)
    overlap = overlap_mode(x.device)
    rms_norm_kernel[(M,)](
        x,
        out,
        out,
        x.stride(0),
        out.stride(0),
        width,
        float(original_width),
        float(eps),
        SUMSQ_ONLY=sumsq_only,
        BLOCK=triton.next_power_of_2(width),
        OVERLAP=overlap,
        **launch_options(overlap),
        num_warps=4,
    )
    return out
