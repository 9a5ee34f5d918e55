"""The fast path's products through the vendor library (cuBLAS) instead of our Triton kernels.

Same functions and signatures as kernels.fused_linear / kernels.gated_linear, computed in
the model's dtype with library matrix products and the epilogue as separate element-wise
operations (inside CUDA graphs those cost GPU time, not launch overhead). The benchmark
times both in one run; whichever reads or multiplies faster on a given GPU and size is the
one to use (FastTransformer's `products` option). A quantized weight is dequantized into a
float weight for each product (one pass over its codes, kernels/quantized_linear.py): at
prefill sizes the product's arithmetic outweighs that pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sliceserve.kernels.activations import reference_activation
from sliceserve.kernels.fused_linear import row_scale_reference
from sliceserve.kernels.quantized_linear import dequantize_weight, is_quantized


def float_weight(w, dtype: torch.dtype):
    """The weight as the library multiplies it: float, dequantized first where it is codes
    (None stays None)."""
    return dequantize_weight(w, dtype) if is_quantized(w) else w


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
    """As fused_linear, in as few passes over the output as the library allows: the norm's row
    scale on the input (the narrower side of every product here, as the reference normalises
    before its projection), bias and residual added by the products themselves where no
    activation lies between, sums of squares in one float32 reduction."""
    w, w2 = float_weight(w, a.dtype), float_weight(w2, a.dtype)
    if norm is not None:
        a = a * row_scale_reference(*norm).to(a.dtype)
    if activation == "none" and residual is not None:
        acc, residual = torch.addmm(residual, a, w.T), None
    else:
        acc = F.linear(a, w)
    if a2 is not None:
        acc = torch.addmm(acc, a2, w2.T)
    if bias is not None:
        acc = acc + bias
    acc = reference_activation(acc, activation)
    if residual is not None:
        acc = acc + residual
    if not sumsq:
        return acc, None
    wide = torch.promote_types(acc.dtype, torch.float32)  # float32 at least: half precision sums overflow
    return acc, torch.linalg.vector_norm(acc, dim=-1, keepdim=True, dtype=wide).square()


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
    gate, up = float_weight(gate, a.dtype), float_weight(up, a.dtype)
    if norm is not None:  # scale the input, not the products, so that the biases stay unscaled
        a = a * row_scale_reference(*norm).to(a.dtype)
    return reference_activation(F.linear(a, gate, gate_bias), activation) * F.linear(a, up, up_bias)
