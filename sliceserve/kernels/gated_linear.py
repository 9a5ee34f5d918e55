"""The first half of a gated MLP in one kernel: act(norm(a) @ gate.T) * (norm(a) @ up.T).

Each program computes the same column tile of the gate and the up projection, so the
product is formed in registers; neither projection is written to memory. The norm's row
scale comes from the partial sums of squares of `a` (see fused_linear.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sliceserve.kernels.activations import ACTIVATION_CODES, apply_activation, reference_activation
from sliceserve.kernels.fused_linear import (
    TileConfig,
    dot_precision,
    fitting_stages,
    row_scale_from_partials,
    row_scale_reference,
    tiles_for,
)
from sliceserve.kernels.launch import (
    launch_options,
    main_loop_done,
    overlap_mode,
    prefetch_lines,
    prefetch_then_wait,
)


@triton.jit
def gated_linear_kernel(
    a_ptr,
    gate_ptr,
    up_ptr,
    gate_bias_ptr,
    up_bias_ptr,
    out_ptr,
    norm_ptr,
    M,
    N,
    K,
    norm_tiles,
    norm_width,
    eps,
    stride_a,
    stride_w,
    stride_out,
    stride_norm,
    HAS_BIAS: tl.constexpr,
    NORM_IN: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NORM_TILES_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    OVERLAP: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    LINE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    prefetch_then_wait(gate_ptr, stride_w, offs_n, N, K, OVERLAP, PREFETCH_LINES, LINE)
    offs_k = tl.arange(0, BLOCK_K)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_a + k[None, :], mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0
        )
        w_mask = (offs_n[None, :] < N) & (k[:, None] < K)
        w_offsets = offs_n[None, :] * stride_w + k[:, None]
        gate += tl.dot(a, tl.load(gate_ptr + w_offsets, mask=w_mask, other=0.0), input_precision=PRECISION)
        up += tl.dot(a, tl.load(up_ptr + w_offsets, mask=w_mask, other=0.0), input_precision=PRECISION)
    main_loop_done(OVERLAP)
    if NORM_IN:
        r = row_scale_from_partials(norm_ptr, stride_norm, offs_m, M, norm_tiles, norm_width, eps, NORM_TILES_P2)
        gate = gate * r[:, None]
        up = up * r[:, None]
    n_ok = offs_n < N
    if HAS_BIAS:
        gate += tl.load(gate_bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        up += tl.load(up_bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = apply_activation(gate, ACTIVATION) * up
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def gated_linear(
    a: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    activation: str = "silu",
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, int, float] | None = None,
    out: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """a (M, K); gate, up (N, K), same layout and strides; biases both or neither."""
    M, K = a.shape
    N = gate.shape[0]
    if gate.stride() != up.stride() or (gate_bias is None) != (up_bias is None):
        raise ValueError("gate and up must share a layout, and have biases both or neither")
    tiles = tiles or tiles_for(M)
    out = torch.empty((M, N), device=a.device, dtype=a.dtype) if out is None else out
    norm_partials, norm_width, eps = norm if norm is not None else (None, 1, 0.0)
    grid = (triton.cdiv(N, tiles.block_n), triton.cdiv(M, tiles.block_m))
    overlap = overlap_mode(a.device)
    lines, line = prefetch_lines(gate.element_size())
    gated_linear_kernel[grid](
        a,
        gate,
        up,
        gate_bias if gate_bias is not None else out,
        up_bias if up_bias is not None else out,
        out,
        norm_partials if norm_partials is not None else out,
        M,
        N,
        K,
        norm_partials.shape[1] if norm_partials is not None else 1,
        float(norm_width),
        float(eps),
        a.stride(0),
        gate.stride(0),
        out.stride(0),
        norm_partials.stride(0) if norm_partials is not None else 0,
        HAS_BIAS=gate_bias is not None,
        NORM_IN=norm_partials is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        NORM_TILES_P2=triton.next_power_of_2(norm_partials.shape[1]) if norm_partials is not None else 1,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        PRECISION=dot_precision(a.dtype),
        OVERLAP=overlap,
        PREFETCH_LINES=lines,
        LINE=line,
        **launch_options(overlap),
        num_warps=tiles.num_warps,
        num_stages=fitting_stages(tiles, 2, a.element_size(), a.device),
    )
    return out


def gated_linear_reference(
    a: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    activation: str = "silu",
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, int, float] | None = None,
) -> torch.Tensor:
    g, u = a.float() @ gate.float().T, a.float() @ up.float().T
    if norm is not None:
        r = row_scale_reference(*norm)
        g, u = g * r, u * r
    if gate_bias is not None:
        g, u = g + gate_bias.float(), u + up_bias.float()
    return (reference_activation(g, activation) * u).to(a.dtype)
