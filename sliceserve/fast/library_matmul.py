"""The fast path's products through the vendor library (cuBLAS) instead of our Triton kernels.

Same functions and signatures as kernels.fused_linear / kernels.gated_linear, computed in
the model's dtype with library matrix products and the epilogue as separate element-wise
operations, as few as the library allows: the input's norm by the RMSNorm kernel from the
input itself (the partial sums of squares the fused kernels take are not needed, so the
layers ask for none between library products: fast/model.py's `keeps_sums`), gate and up as
one product of their stacked weights when they are stored so (fast/quantized_weights.py's
`paired`), its halves gated in one pass (kernels/gated_activation.py). Outside CUDA graphs
each operation costs launch time on the host, which a prefill's small steps are bound by;
inside them, GPU time. The benchmark
times both in one run; whichever reads or multiplies faster on a given GPU and size is the
one to use (FastTransformer's `products` option). A quantized weight is dequantized into a
float weight for each product (one pass over its codes, kernels/quantized_linear.py): at
prefill sizes the product's arithmetic outweighs that pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sliceserve.kernels.activations import reference_activation
from sliceserve.kernels.gated_activation import gated_activation
from sliceserve.kernels.quantized_linear import dequantize_weight, is_quantized
from sliceserve.kernels.rms_norm import rms_norm


def float_weight(w, dtype: torch.dtype):
    """The weight as the library multiplies it: float, dequantized first where it is codes
    (None stays None)."""
    return dequantize_weight(w, dtype) if is_quantized(w) else w


def normalised(a: torch.Tensor, norm) -> torch.Tensor:
    """The product's input as the reference normalises it: the weightless RMSNorm of `a` over
    the model's original width, computed from `a` (norm's partial sums, when given, are those
    of `a` too, and not read)."""
    if norm is None:
        return a
    _, width, eps = norm
    return rms_norm(a, width, eps)


def stacked_rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor | None:
    """(N1 + N2, K) view of two weights stored one after the other in one tensor (None if not)."""
    if (
        first.dim() != 2
        or first.stride() != second.stride()
        or first.stride(1) != 1
        or first.shape[1] != second.shape[1]
    ):
        return None
    if first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr():
        return None
    if second.storage_offset() != first.storage_offset() + first.shape[0] * first.stride(0):
        return None
    return first.as_strided((first.shape[0] + second.shape[0], first.shape[1]), first.stride())


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
    a = normalised(a, norm)
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
    a = normalised(a, norm)  # the input, not the products, so that the biases stay unscaled
    both = stacked_rows(gate, up)
    if both is None:
        return gated_activation(F.linear(a, gate), F.linear(a, up), activation, gate_bias, up_bias)
    products = F.linear(a, both)
    n = gate.shape[0]
    return gated_activation(products[:, :n], products[:, n:], activation, gate_bias, up_bias)
