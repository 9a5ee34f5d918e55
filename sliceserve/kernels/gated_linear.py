"""The first half of a gated MLP in one kernel: act(norm(a) @ gate.T) * (norm(a) @ up.T).

Each program computes the same column tile of the gate and the up projection, so the
product is formed in registers; neither projection is written to memory. The norm's row
scale comes from the partial sums of squares of `a` (see fused_linear.py). Gate and up may
be quantized, both in one format (kernels/quantized_linear.py): dequantized inside the
products, the format a compile-time constant (float weights compile as they always did).
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
    quantized_stage_bytes,
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
from sliceserve.kernels.quantized_linear import accumulate_quantized_pair, multiplied_weight, weight_operand


@triton.jit
def gated_linear_kernel(
    a_ptr,
    gate_ptr,
    up_ptr,
    gate_scales_ptr,
    up_scales_ptr,
    gate_zeros_ptr,
    up_zeros_ptr,
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
    stride_s,
    stride_out,
    stride_norm,
    W_BITS: tl.constexpr,
    W_GROUP: tl.constexpr,
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
    w_row = K  # a weight row's length as stored
    if W_BITS == 4:
        w_row = (K + 1) // 2
    prefetch_then_wait(gate_ptr, stride_w, offs_n, N, w_row, OVERLAP, PREFETCH_LINES, LINE)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_BITS == 16:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_a + k[None, :],
                mask=(offs_m[:, None] < M) & (k[None, :] < K),
                other=0.0,
            )
            w_mask = (offs_n[None, :] < N) & (k[:, None] < K)
            w_offsets = offs_n[None, :] * stride_w + k[:, None]
            gate += tl.dot(a, tl.load(gate_ptr + w_offsets, mask=w_mask, other=0.0), input_precision=PRECISION)
            up += tl.dot(a, tl.load(up_ptr + w_offsets, mask=w_mask, other=0.0), input_precision=PRECISION)
    else:
        gate, up = accumulate_quantized_pair(
            gate,
            up,
            a_ptr,
            stride_a,
            gate_ptr,
            up_ptr,
            stride_w,
            gate_scales_ptr,
            up_scales_ptr,
            gate_zeros_ptr,
            up_zeros_ptr,
            stride_s,
            offs_m,
            offs_n,
            M,
            N,
            K,
            W_BITS,
            W_GROUP,
            BLOCK_K,
            BLOCK_N,
            PRECISION,
        )
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
    gate,
    up,
    *,
    activation: str = "silu",
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, int, float] | None = None,
    out: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """a (M, K); gate, up (N, K), same layout and strides (float tensors, or quantized weights
    of one format); biases both or neither."""
    M, K = a.shape
    N = gate.shape[0]
    g, u = weight_operand(gate), weight_operand(up)
    same_layout = (g.bits, g.group, g.row_stride, g.scale_stride) == (u.bits, u.group, u.row_stride, u.scale_stride)
    if not same_layout or g.data.stride() != u.data.stride() or (gate_bias is None) != (up_bias is None):
        raise ValueError("gate and up must share a layout, and have biases both or neither")
    tiles = tiles or tiles_for(M, g.bits)
    out = torch.empty((M, N), device=a.device, dtype=a.dtype) if out is None else out
    norm_partials, norm_width, eps = norm if norm is not None else (None, 1, 0.0)
    grid = (triton.cdiv(N, tiles.block_n), triton.cdiv(M, tiles.block_m))
    overlap = overlap_mode(a.device)
    lines, line = prefetch_lines(g.data.element_size())
    stage_bytes = quantized_stage_bytes([g, u], tiles, a.element_size())
    if stage_bytes is not None:  # the activations' tile is shared by both weights
        stage_bytes -= tiles.block_m * g.step(tiles.block_k) * a.element_size()
    gated_linear_kernel[grid](
        a,
        g.data,
        u.data,
        g.scales if g.scales is not None else out,
        u.scales if u.scales is not None else out,
        g.zeros if g.zeros is not None else out,
        u.zeros if u.zeros is not None else out,
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
        g.row_stride,
        g.scale_stride,
        out.stride(0),
        norm_partials.stride(0) if norm_partials is not None else 0,
        W_BITS=g.bits,
        W_GROUP=g.group,
        HAS_BIAS=gate_bias is not None,
        NORM_IN=norm_partials is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        NORM_TILES_P2=triton.next_power_of_2(norm_partials.shape[1]) if norm_partials is not None else 1,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=g.step(tiles.block_k),
        PRECISION=dot_precision(a.dtype),
        OVERLAP=overlap,
        PREFETCH_LINES=lines,
        LINE=line,
        **launch_options(overlap),
        num_warps=tiles.num_warps,
        num_stages=fitting_stages(tiles, 2, a.element_size(), a.device, stage_bytes=stage_bytes),
    )
    return out


def gated_linear_reference(
    a: torch.Tensor,
    gate,
    up,
    *,
    activation: str = "silu",
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, int, float] | None = None,
) -> torch.Tensor:
    g, u = a.float() @ multiplied_weight(gate, a.dtype).T, a.float() @ multiplied_weight(up, a.dtype).T
    if norm is not None:
        r = row_scale_reference(*norm)
        g, u = g * r, u * r
    if gate_bias is not None:
        g, u = g + gate_bias.float(), u + up_bias.float()
    return (reference_activation(g, activation) * u).to(a.dtype)
