"""act(gate) * up of a gated MLP, in one pass over the two products' outputs.

The library path (fast/library_matmul.py) has cuBLAS write gate and up side by side as one
product of the stacked weights; this kernel then reads both halves once and writes the
gated activation: one pass where the activation, then the multiplication, took two (and
one launch where they took two or three with biases). Biases are added here in float32, the
activation and product computed in float32 and rounded once. One program per row and block of
columns; gate and up may be any two (M, N) views with unit column stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sliceserve.kernels.activations import ACTIVATION_CODES, apply_activation
from sliceserve.kernels.reference import reference_activation

BLOCK = 1024  # columns a program: eight halves a thread with four warps, in 16-byte loads


@triton.jit
def gated_activation_kernel(
    gate_ptr,
    up_ptr,
    gate_bias_ptr,
    up_bias_ptr,
    out_ptr,
    stride_gate,
    stride_up,
    stride_out,
    N,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        gate += tl.load(gate_bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        up += tl.load(up_bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    out = apply_activation(gate, ACTIVATION) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def gated_activation(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(gate + gate_bias) * (up + up_bias), (M, N) in gate's dtype. Both biases or neither."""
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("give both biases or neither")
    if gate.shape != up.shape or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must be (M, N) with unit column stride")
    m, n = gate.shape
    out = torch.empty((m, n), device=gate.device, dtype=gate.dtype)
    if m == 0:
        return out
    has_bias = gate_bias is not None
    gated_activation_kernel[(m, triton.cdiv(n, BLOCK))](
        gate,
        up,
        gate_bias if has_bias else gate,
        up_bias if has_bias else gate,
        out,
        gate.stride(0),
        up.stride(0),
        out.stride(0),
        n,
        HAS_BIAS=has_bias,
        ACTIVATION=ACTIVATION_CODES[activation],
        BLOCK=BLOCK,
        num_warps=4,
    )
    return out


def gated_activation_reference(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel's reference: the same formula in float32, rounded once to gate's dtype."""
    g, u = gate.float(), up.float()
    if gate_bias is not None:
        g, u = g + gate_bias.float(), u + up_bias.float()
    return (reference_activation(g, activation) * u).to(gate.dtype)
