"""One matrix product with everything around it fused: the workhorse of the fast path.

    out = act(r * (a @ w.T) + a2 @ w2.T + bias) + residual

- `r` is the weightless RMSNorm's row scale of `a`, 1 / sqrt(sum(a^2) / width + eps),
  computed from per-row partial sums of squares that the kernel which wrote `a` left
  behind. The norm has no weight, so norm(a) @ w.T = r * (a @ w.T): the scale is applied
  here, in the epilogue, and the normalised activations are never written (FlashNorm).
- `a2 @ w2.T` lets one kernel compute a sliced layer's whole residual update: with
  a = x, w = the shortcut matrix and a2 = attention output, w2 = the output projection,
  out = x @ S + attn @ Wo is the new residual stream in one pass.
- With `sumsq_out`, every program also writes the sum of squares of its output tile per
  row, so the next kernel can apply the norm of `out` without another pass over it.

Weights keep PyTorch's (out, in) layout. Either weight may also be quantized (int8, or 4-bit
codes two a byte, with scales per group of inputs: kernels/quantized_linear.py), and is then
dequantized inside the product; the weight's format is a compile-time constant of the kernel,
so a float weight's product compiles as it always did. Rows never interact and, for one tile
configuration, the reduction order over the inner dimension does not depend on how many
rows there are: within the decode tiles' range (up to 16 rows) a request's numbers do not
depend on its neighbours in a batch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sliceserve.kernels.activations import ACTIVATION_CODES, apply_activation, reference_activation
from sliceserve.kernels.launch import (
    launch_options,
    main_loop_done,
    overlap_mode,
    prefetch_lines,
    prefetch_then_wait,
)
from sliceserve.kernels.quantized_linear import (
    FLOAT_WEIGHT,
    WeightOperand,
    accumulate_quantized,
    multiplied_weight,
    weight_operand,
)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Decode: few rows, so narrow column tiles to spread the weight read over every SM, and a
# deep pipeline of long K steps to keep enough loads in flight (the H100 sweep in
# benchmarks/results/gpu_fast_path.json: best or near-best on all four 7B shapes).
DECODE_TILES = TileConfig(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=5)
# 17-64 rows (decode of batches 32-64): the prefill tiles waste most of each tile there;
# these read 55-82% of copy bandwidth on the 7B shapes where those read 23-70%
# (benchmarks/results/middle_tiles_sweep.md, H100).
MIDDLE_TILES = TileConfig(block_m=64, block_n=32, block_k=128, num_warps=4, num_stages=4)
PREFILL_TILES = TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
# Quantized weights at decode sizes, by bits; block_k is the inputs a step (quantized_linear.py).
# 4 bits: the H200 sweep's best on all four 7B products (quant_decode_h200_2-registers-sweep-int4.md:
# 512 inputs a step, 16-22% of copy bandwidth against 12-18% with 256), although gate+up spills
# there; 8 bits not yet swept on this loop: 256 inputs a step (no spills, compiled for sm_90).
QUANTIZED_DECODE_TILES = {
    8: TileConfig(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=4),
    4: TileConfig(block_m=16, block_n=32, block_k=512, num_warps=4, num_stages=4),
}


def tiles_for(rows: int, bits: int = 16) -> TileConfig:
    """The tiles of a product of `rows` rows whose weights have `bits` bits (16: float)."""
    if rows <= DECODE_TILES.block_m:
        return QUANTIZED_DECODE_TILES.get(bits, DECODE_TILES)
    return MIDDLE_TILES if rows <= MIDDLE_TILES.block_m else PREFILL_TILES


@functools.cache
def shared_memory_bytes(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def fitting_stages(
    tiles: TileConfig, weights: int, element_size: int, device: torch.device, stage_bytes: int | None = None
) -> int:
    """The pipeline depth that fits the GPU's shared memory: five stages of the decode tiles
    fit an H100 (227 KiB) but not a consumer card (100 KiB), where fewer still run well.
    `weights` counts the weight tiles loaded per step (2 for gate and up, or for a second
    product whose buffers may live at the same time as the first's); `stage_bytes`, where
    given, is a stage's size instead (quantized weights: WeightOperand.stage_bytes)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return tiles.num_stages
    per_stage = (tiles.block_m + weights * tiles.block_n) * tiles.block_k * element_size
    per_stage = stage_bytes if stage_bytes is not None else per_stage
    spare = shared_memory_bytes(device.index if device.index is not None else torch.cuda.current_device()) - 16 * 1024
    return max(2, min(tiles.num_stages, spare // per_stage))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands multiply exactly (ieee), not in TF32: float32 runs are for checking,
    where exactness matters and speed does not. Half-precision operands ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def sumsq_tiles(n: int, tiles: TileConfig) -> int:
    """Columns of the partial sums of squares a product of width n leaves behind."""
    return triton.cdiv(n, tiles.block_n)


@triton.jit
def row_scale_from_partials(partials_ptr, stride, offs_m, M, tiles, width, eps, TILES_P2: tl.constexpr):
    """1/rms per row from the partial sums of squares of its tiles."""
    t = tl.arange(0, TILES_P2)
    p = tl.load(
        partials_ptr + offs_m[:, None] * stride + t[None, :],
        mask=(offs_m[:, None] < M) & (t[None, :] < tiles),
        other=0.0,
    )
    return 1.0 / tl.sqrt(tl.sum(p, axis=1) / width + eps)


@triton.jit
def accumulate_product(
    acc, a_ptr, stride_a, w_ptr, stride_w, offs_m, offs_n, M, N, K, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr
):
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_a + k[None, :], mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0
        )
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_w + k[:, None], mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0.0
        )
        acc += tl.dot(a, w, input_precision=PRECISION)
    return acc


@triton.jit
def accumulate_weight(
    acc,
    a_ptr,
    stride_a,
    w_ptr,
    stride_w,
    s_ptr,
    z_ptr,
    stride_s,
    offs_m,
    offs_n,
    M,
    N,
    K,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + a @ w.T for a float weight (BITS 16: exactly accumulate_product) or a quantized one."""
    if BITS == 16:
        acc = accumulate_product(acc, a_ptr, stride_a, w_ptr, stride_w, offs_m, offs_n, M, N, K, BLOCK_K, PRECISION)
    else:
        acc = accumulate_quantized(
            acc,
            a_ptr,
            stride_a,
            w_ptr,
            stride_w,
            s_ptr,
            z_ptr,
            stride_s,
            offs_m,
            offs_n,
            M,
            N,
            K,
            BITS,
            GROUP,
            BLOCK_K,
            BLOCK_N,
            PRECISION,
        )
    return acc


@triton.jit
def fused_linear_kernel(
    a_ptr,
    w_ptr,
    a2_ptr,
    w2_ptr,
    w_scales_ptr,
    w_zeros_ptr,
    w2_scales_ptr,
    w2_zeros_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    norm_ptr,
    sumsq_ptr,
    M,
    N,
    K,
    K2,
    norm_tiles,
    norm_width,
    eps,
    stride_a,
    stride_w,
    stride_a2,
    stride_w2,
    stride_ws,
    stride_w2s,
    stride_res,
    stride_out,
    stride_norm,
    stride_sumsq,
    W_BITS: tl.constexpr,
    W_GROUP: tl.constexpr,
    W2_BITS: tl.constexpr,
    W2_GROUP: tl.constexpr,
    HAS_A2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    NORM_IN: tl.constexpr,
    SUMSQ_OUT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NORM_TILES_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_K2: tl.constexpr,
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
    prefetch_then_wait(w_ptr, stride_w, offs_n, N, w_row, OVERLAP, PREFETCH_LINES, LINE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate_weight(
        acc,
        a_ptr,
        stride_a,
        w_ptr,
        stride_w,
        w_scales_ptr,
        w_zeros_ptr,
        stride_ws,
        offs_m,
        offs_n,
        M,
        N,
        K,
        W_BITS,
        W_GROUP,
        BLOCK_N,
        BLOCK_K,
        PRECISION,
    )
    if NORM_IN:
        r = row_scale_from_partials(norm_ptr, stride_norm, offs_m, M, norm_tiles, norm_width, eps, NORM_TILES_P2)
        acc = acc * r[:, None]
    if HAS_A2:
        acc = accumulate_weight(
            acc,
            a2_ptr,
            stride_a2,
            w2_ptr,
            stride_w2,
            w2_scales_ptr,
            w2_zeros_ptr,
            stride_w2s,
            offs_m,
            offs_n,
            M,
            N,
            K2,
            W2_BITS,
            W2_GROUP,
            BLOCK_N,
            BLOCK_K2,
            PRECISION,
        )
    main_loop_done(OVERLAP)
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION)
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offs_m[:, None] * stride_res + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], out, mask=mask)
    if SUMSQ_OUT:
        # The squares of the values as stored: the next norm sees exactly what it reads.
        v = tl.where(mask, out.to(tl.float32), 0.0)
        tl.store(sumsq_ptr + offs_m * stride_sumsq + pid_n, tl.sum(v * v, axis=1), mask=offs_m < M)


def fused_linear(
    a: torch.Tensor,
    w,
    *,
    a2: torch.Tensor | None = None,
    w2=None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, int, float] | None = None,
    activation: str = "none",
    sumsq: bool = False,
    out: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, partial sums of squares of out or None); see the module docstring.

    a (M, K), w (N, K), a2 (M, K2), w2 (N, K2), bias (N,), residual (M, N);
    norm = (partial sums of squares of a (M, T), original width, eps). w and w2 are float
    tensors or quantized weights (QuantizedWeight), independently.
    """
    M, K = a.shape
    N = w.shape[0]
    first = weight_operand(w)
    second = weight_operand(w2) if w2 is not None else None
    tiles = tiles or tiles_for(M, min(first.bits, second.bits if second is not None else FLOAT_WEIGHT))
    out = torch.empty((M, N), device=a.device, dtype=a.dtype) if out is None else out
    n_tiles = sumsq_tiles(N, tiles)
    partials = torch.empty((M, n_tiles), device=a.device, dtype=torch.float32) if sumsq else None
    norm_partials, norm_width, eps = norm if norm is not None else (None, 1, 0.0)
    dummy = out  # stands in for absent pointers; never read
    grid = (n_tiles, triton.cdiv(M, tiles.block_m))
    overlap = overlap_mode(a.device)
    lines, line = prefetch_lines(first.data.element_size())
    products = [first] if second is None else [first, second]
    stages = fitting_stages(
        tiles,
        len(products),
        a.element_size(),
        a.device,
        stage_bytes=quantized_stage_bytes(products, tiles, a.element_size()),
    )
    fused_linear_kernel[grid](
        a,
        first.data,
        a2 if a2 is not None else dummy,
        second.data if second is not None else dummy,
        first.scales if first.scales is not None else dummy,
        first.zeros if first.zeros is not None else dummy,
        second.scales if second is not None and second.scales is not None else dummy,
        second.zeros if second is not None and second.zeros is not None else dummy,
        bias if bias is not None else dummy,
        residual if residual is not None else dummy,
        out,
        norm_partials if norm_partials is not None else dummy,
        partials if partials is not None else dummy,
        M,
        N,
        K,
        a2.shape[1] if a2 is not None else 0,
        norm_partials.shape[1] if norm_partials is not None else 1,
        float(norm_width),
        float(eps),
        a.stride(0),
        first.row_stride,
        a2.stride(0) if a2 is not None else 0,
        second.row_stride if second is not None else 0,
        first.scale_stride,
        second.scale_stride if second is not None else 0,
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        norm_partials.stride(0) if norm_partials is not None else 0,
        partials.stride(0) if partials is not None else 0,
        W_BITS=first.bits,
        W_GROUP=first.group,
        W2_BITS=second.bits if second is not None else FLOAT_WEIGHT,
        W2_GROUP=second.group if second is not None else 1,
        HAS_A2=a2 is not None,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        NORM_IN=norm_partials is not None,
        SUMSQ_OUT=sumsq,
        ACTIVATION=ACTIVATION_CODES[activation],
        NORM_TILES_P2=triton.next_power_of_2(norm_partials.shape[1]) if norm_partials is not None else 1,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=first.step(tiles.block_k),
        BLOCK_K2=second.step(tiles.block_k) if second is not None else tiles.block_k,
        PRECISION=dot_precision(a.dtype),
        OVERLAP=overlap,
        PREFETCH_LINES=lines,
        LINE=line,
        **launch_options(overlap),
        num_warps=tiles.num_warps,
        num_stages=stages,
    )
    return out, partials


def quantized_stage_bytes(products: list[WeightOperand], tiles: TileConfig, element_size: int) -> int | None:
    """A pipeline stage's shared memory when a product has quantized weights (None: all float,
    where fitting_stages counts as it always did)."""
    if all(p.bits == FLOAT_WEIGHT for p in products):
        return None
    return sum(p.stage_bytes(tiles.block_m, tiles.block_n, tiles.block_k, element_size) for p in products)


def row_scale_reference(partials: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    return torch.rsqrt(partials.float().sum(-1, keepdim=True) / width + eps)


def fused_linear_reference(
    a: torch.Tensor,
    w,
    *,
    a2: torch.Tensor | None = None,
    w2=None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, int, float] | None = None,
    activation: str = "none",
    sumsq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same function in plain PyTorch, in float32 (quantized weights dequantized to a's dtype,
    as the kernels multiply them: quantized_linear.multiplied_weight); partial sums collapsed
    to one column."""
    acc = a.float() @ multiplied_weight(w, a.dtype).T
    if norm is not None:
        acc = acc * row_scale_reference(*norm)
    if a2 is not None:
        acc = acc + a2.float() @ multiplied_weight(w2, a2.dtype).T
    if bias is not None:
        acc = acc + bias.float()
    acc = reference_activation(acc, activation)
    if residual is not None:
        acc = acc + residual.float()
    out = acc.to(a.dtype)
    return out, (out.float().pow(2).sum(-1, keepdim=True) if sumsq else None)
