"""Products with quantized weights: the K loop that dequantizes inside the product, and the
dequantization alone (for prefill, where the library's product is faster).

A quantized weight (model/quantized.py's QuantizedWeight; read here by its attributes: this
layer may not import the model's) stores, per output row n and group g of `group_size` inputs:
    8 bits: int8 codes q,                    w[n, k] = q[n, k] * s[n, g]
    4 bits: two codes a byte (even k low),   w[n, k] = (q[n, k] - z[n, g]) * s[n, g]

Each step of the main loop reads `step` inputs (the tiles' block_k, no more than the inputs'
next power of two) and does what a float product's step does, with the weight tile made in
registers first:
- the codes tile in the weights' own layout, (block_n rows, step inputs), each row's bytes
  contiguous: int8 (block_n, step), or uint8 (block_n, step / 2) unpacked by joining the low
  and high nibbles, which puts them in input order (even input low);
- the step's scales (and zero points) as one (block_n,) vector where the step lies inside a
  group, else a (block_n, step / group_size) tile broadcast over each group's inputs;
- w = (q - z) * s in the activations' dtype, then one dot of the (block_m, step) activations
  with w.T into the float32 accumulator.
The software pipeliner (num_stages) overlaps the activation and code loads, which it copies
through shared memory; the scales and zero points, too small for its copies, are loaded one
step ahead by hand. The codes become floats by bit operations (biased_float), not by the
integer-to-float conversion, which runs at an eighth of the arithmetic rate.

q - z is an integer of at most 8 bits, exact in float16 and bfloat16, and so is its product
with a scale in float32: w computed in the activations' dtype is that product rounded once,
exactly the weight model/quantized.py's loader gives the reference model, and what
`multiplied_weight` gives the kernels' references. Group sizes are powers of two (a step then
holds whole groups or lies inside one), at least 16: the loop would take smaller ones, but
then 4-bit codes' scales and zero points weigh three quarters of the codes or more. Other
sizes are refused (the fast path dequantizes those).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

FLOAT_WEIGHT = 16  # the "bits" of a float weight: multiplied as stored
QUANTIZED_BITS = (8, 4)
MIN_GROUP = 16
MIN_STEP = 16  # the matrix units' shortest inner dimension


class WeightOperand(NamedTuple):
    """What a kernel reads of one weight (N, K): float values, or codes with their scales."""

    data: torch.Tensor  # the float weight, or the codes
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    bits: int
    group: int
    inputs: int  # K
    row_stride: int
    scale_stride: int

    def step(self, block_k: int) -> int:
        """Inputs per step of the main loop: block_k, for codes no more than the inputs' next
        power of two (parts of a step past the inputs are wasted work)."""
        if self.bits == FLOAT_WEIGHT:
            return block_k
        return max(min(block_k, triton.next_power_of_2(self.inputs)), MIN_STEP)

    def stage_bytes(self, block_m: int, block_n: int, block_k: int, element_size: int) -> int:
        """Shared memory one pipeline stage of this product takes: its activation and weight
        tiles, and for codes the step's scales and zero points."""
        step = self.step(block_k)
        if self.bits == FLOAT_WEIGHT:
            return (block_m + block_n) * step * element_size
        groups = max(1, step // self.group)
        scales = block_n * groups * (self.scales.element_size() + (1 if self.zeros is not None else 0))
        return block_m * step * element_size + block_n * step * self.bits // 8 + scales


def is_quantized(w) -> bool:
    return w is not None and not isinstance(w, torch.Tensor)


def supports_quantized(w) -> bool:
    """Whether the kernels multiply this quantized weight (else: dequantize it first)."""
    group = w.group_size
    return w.bits in QUANTIZED_BITS and group >= MIN_GROUP and group & (group - 1) == 0


def weight_operand(w) -> WeightOperand:
    """A float weight (N, K) or a quantized one, checked and described for a kernel launch."""
    if not is_quantized(w):
        return WeightOperand(w, None, None, FLOAT_WEIGHT, 1, w.shape[1], w.stride(0), 0)
    if not supports_quantized(w):
        raise ValueError(f"{w.bits}-bit groups of {w.group_size}: the kernels take powers of two from {MIN_GROUP}")
    n, k = w.codes.shape[0], w.in_features
    stored = k if w.bits == 8 else -(-k // 2)
    groups = -(-k // w.group_size)
    if w.codes.shape[1] != stored or w.codes.stride(1) != 1 or tuple(w.scales.shape) != (n, groups):
        raise ValueError(f"codes {tuple(w.codes.shape)} / scales {tuple(w.scales.shape)} do not store ({n}, {k})")
    if w.scales.stride(1) != 1 or (w.zeros is not None and w.zeros.stride() != w.scales.stride()):
        raise ValueError("scales and zero points must be row-major, with one layout")
    if (w.bits == 4) != (w.zeros is not None):
        raise ValueError("4-bit weights have zero points, 8-bit ones none")
    return WeightOperand(w.codes, w.scales, w.zeros, w.bits, w.group_size, k, w.codes.stride(0), w.scales.stride(0))


@triton.jit
def load_activations(a_ptr, stride_a, offs_m, M, K, k0, STEP: tl.constexpr):
    """a[offs_m, k0 : k0 + STEP], zeros outside a."""
    k = k0 + tl.arange(0, STEP)
    return tl.load(
        a_ptr + offs_m[:, None] * stride_a + k[None, :], mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0
    )


@triton.jit
def load_codes(q_ptr, stride_q, offs_n, N, K, k0, BITS: tl.constexpr, STEP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The codes of w[offs_n, k0 : k0 + STEP] as a (BLOCK_N, STEP) integer tile, in input order."""
    n_ok = offs_n < N
    if BITS == 8:
        k = k0 + tl.arange(0, STEP)
        q = tl.load(q_ptr + offs_n[:, None] * stride_q + k[None, :], mask=n_ok[:, None] & (k[None, :] < K), other=0)
    else:
        # The bytes holding inputs 2j (low nibble) and 2j + 1, of the row's K - K // 2 (written
        # so that the bound keeps K's divisibility, which (K + 1) // 2 or 2j < K would lose:
        # the masked loads then stay vectorised, and pipelined).
        j = k0 // 2 + tl.arange(0, STEP // 2)
        packed = tl.load(
            q_ptr + offs_n[:, None] * stride_q + j[None, :], mask=n_ok[:, None] & (j[None, :] < K - K // 2), other=0
        )
        q = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, STEP))
    return q


@triton.jit
def load_group_parameters(
    s_ptr, z_ptr, stride_s, offs_n, N, K, k0, BITS: tl.constexpr, GROUP: tl.constexpr, STEP: tl.constexpr
):
    """(scales, zero points) of the step at k0: (BLOCK_N,) vectors where the step lies inside a
    group, else (BLOCK_N, STEP // GROUP) tiles; zeros past N or K (a step past K loads nothing).
    8-bit weights have no zero points: the scales stand in for them, never used."""
    if STEP <= GROUP:
        g = k0 // GROUP
        mask = offs_n < tl.where(k0 < K, N, 0)
        offsets = offs_n * stride_s + g
    else:
        g = k0 // GROUP + tl.arange(0, STEP // GROUP)
        mask = (offs_n[:, None] < N) & (g[None, :] * GROUP < K)
        offsets = offs_n[:, None] * stride_s + g[None, :]
    scale = tl.load(s_ptr + offsets, mask=mask, other=0.0)
    zero = scale
    if BITS == 4:
        zero = tl.load(z_ptr + offsets, mask=mask, other=0)
    return scale, zero


@triton.jit
def biased_float(u, DTYPE: tl.constexpr):
    """(2^p + u as DTYPE, 2^p): unsigned codes u (uint8) written into the mantissa of 2^p, which
    float16 (p = 10) and float32 (p = 23) hold for every byte and bfloat16 (p = 7) for codes
    under 128. Two bit operations a code, where the integer-to-float conversion runs at 16 a
    cycle per SM (Hopper; an eighth of float32 arithmetic, the CUDA guide's throughput table)."""
    if DTYPE == tl.float32:
        return (u.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True), tl.full([], 8388608.0, DTYPE)
    elif DTYPE == tl.float16:
        return (u.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True), tl.full([], 1024.0, DTYPE)
    else:
        return (u.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True), tl.full([], 128.0, DTYPE)


@triton.jit
def dequantized(
    q,
    scale,
    zero,
    DTYPE: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    STEP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(q - z) * s in DTYPE, a (BLOCK_N, STEP) tile, the step's scales broadcast over their
    groups. The codes are made floats biased (biased_float); the bias joins the zero point
    (int8 codes: 128 + q, unsigned, against a zero point of 128), all exact in DTYPE. bfloat16
    holds biased 4-bit codes but not bytes: int8 codes are converted plainly there."""
    if BITS == 8 and DTYPE == tl.bfloat16:
        w, offset = q.to(DTYPE), tl.full([], 0.0, DTYPE)
    elif BITS == 8:
        w, bias = biased_float(q.to(tl.uint8, bitcast=True) ^ 128, DTYPE)
        offset = bias + 128.0  # stays DTYPE: a Python number takes the tensor's type
    else:
        w, bias = biased_float(q, DTYPE)
        offset = zero.to(DTYPE) + bias
    if STEP <= GROUP:
        if BITS == 4:
            offset = offset[:, None]
        w = (w - offset) * scale.to(DTYPE)[:, None]
    else:
        w = tl.reshape(w, (BLOCK_N, STEP // GROUP, GROUP))
        if BITS == 4:
            offset = offset[:, :, None]
        w = tl.reshape((w - offset) * scale.to(DTYPE)[:, :, None], (BLOCK_N, STEP))
    return w


@triton.jit
def accumulate_quantized(
    acc,
    a_ptr,
    stride_a,
    q_ptr,
    stride_q,
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
    STEP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + a @ w.T over all K inputs, STEP inputs a step: one dot a step. The pipeliner
    overlaps the activation and code loads; the scales, too small for its copies, are loaded
    a step ahead by hand."""
    dtype = a_ptr.dtype.element_ty
    scale, zero = load_group_parameters(s_ptr, z_ptr, stride_s, offs_n, N, K, 0, BITS, GROUP, STEP)
    for k0 in range(0, K, STEP):
        next_scale, next_zero = load_group_parameters(
            s_ptr, z_ptr, stride_s, offs_n, N, K, k0 + STEP, BITS, GROUP, STEP
        )
        a = load_activations(a_ptr, stride_a, offs_m, M, K, k0, STEP)
        q = load_codes(q_ptr, stride_q, offs_n, N, K, k0, BITS, STEP, BLOCK_N)
        w = dequantized(q, scale, zero, dtype, BITS, GROUP, STEP, BLOCK_N)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        scale, zero = next_scale, next_zero
    return acc


@triton.jit
def accumulate_quantized_pair(
    acc_a,
    acc_b,
    x_ptr,
    stride_x,
    qa_ptr,
    qb_ptr,
    stride_q,
    sa_ptr,
    sb_ptr,
    za_ptr,
    zb_ptr,
    stride_s,
    offs_m,
    offs_n,
    M,
    N,
    K,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    STEP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Two products of the same activations x with two weights of one format (gate and up)."""
    dtype = x_ptr.dtype.element_ty
    scale_a, zero_a = load_group_parameters(sa_ptr, za_ptr, stride_s, offs_n, N, K, 0, BITS, GROUP, STEP)
    scale_b, zero_b = load_group_parameters(sb_ptr, zb_ptr, stride_s, offs_n, N, K, 0, BITS, GROUP, STEP)
    for k0 in range(0, K, STEP):
        k_next = k0 + STEP
        next_scale_a, next_zero_a = load_group_parameters(
            sa_ptr, za_ptr, stride_s, offs_n, N, K, k_next, BITS, GROUP, STEP
        )
        next_scale_b, next_zero_b = load_group_parameters(
            sb_ptr, zb_ptr, stride_s, offs_n, N, K, k_next, BITS, GROUP, STEP
        )
        x = load_activations(x_ptr, stride_x, offs_m, M, K, k0, STEP)
        qa = load_codes(qa_ptr, stride_q, offs_n, N, K, k0, BITS, STEP, BLOCK_N)
        qb = load_codes(qb_ptr, stride_q, offs_n, N, K, k0, BITS, STEP, BLOCK_N)
        wa = dequantized(qa, scale_a, zero_a, dtype, BITS, GROUP, STEP, BLOCK_N)
        wb = dequantized(qb, scale_b, zero_b, dtype, BITS, GROUP, STEP, BLOCK_N)
        acc_a = tl.dot(x, tl.trans(wa), acc_a, input_precision=PRECISION)
        acc_b = tl.dot(x, tl.trans(wb), acc_b, input_precision=PRECISION)
        scale_a, zero_a, scale_b, zero_b = next_scale_a, next_zero_a, next_scale_b, next_zero_b
    return acc_a, acc_b


# ---- dequantization alone ----------------------------------------------------------------


@triton.jit
def dequantize_kernel(
    q_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    stride_q,
    stride_s,
    stride_out,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (k[None, :] < K)
    groups = offs_n[:, None] * stride_s + k[None, :] // GROUP
    scale = tl.load(s_ptr + groups, mask=mask, other=0.0).to(tl.float32)
    if BITS == 8:
        q = tl.load(q_ptr + offs_n[:, None] * stride_q + k[None, :], mask=mask, other=0).to(tl.float32)
    else:
        packed = tl.load(q_ptr + offs_n[:, None] * stride_q + k[None, :] // 2, mask=mask, other=0)
        q = ((packed >> ((k[None, :] % 2) * 4).to(tl.uint8)) & 15).to(tl.float32)
        q -= tl.load(z_ptr + groups, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs_n[:, None] * stride_out + k[None, :], (q * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_weight(w, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight (N, K) a quantized weight stands for, in `dtype`: what
    dequantize_reference computes (float32 products, one rounding), on the GPU in one pass."""
    n, k = w.codes.shape[0], w.in_features
    out = torch.empty((n, k), device=w.codes.device, dtype=dtype) if out is None else out
    block_n, block_k = 32, 128
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    dequantize_kernel[grid](
        w.codes,
        w.scales,
        w.zeros if w.zeros is not None else w.scales,
        out,
        n,
        k,
        w.codes.stride(0),
        w.scales.stride(0),
        out.stride(0),
        BITS=w.bits,
        GROUP=w.group_size,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out


def dequantize_reference(w, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The kernels' reference: the float weight (N, K) of a quantized weight (or a float
    weight itself), computed in float32 at least. The same formula as model/quantized.py's
    `dequantize`, which the reference model loads its weights with."""
    if not is_quantized(w):
        return w.to(dtype)
    wide = torch.promote_types(w.scales.dtype, torch.float32)
    k = w.in_features
    if w.bits == 8:
        codes = w.codes.to(wide)
    else:
        low, high = w.codes & 0x0F, w.codes >> 4
        codes = torch.stack([low, high], dim=-1).reshape(w.codes.shape[0], -1)[:, :k].to(wide)
    if w.zeros is not None:
        codes = codes - w.zeros.to(wide).repeat_interleave(w.group_size, dim=1)[:, :k]
    return (codes * w.scales.to(wide).repeat_interleave(w.group_size, dim=1)[:, :k]).to(dtype)


def multiplied_weight(w, dtype: torch.dtype) -> torch.Tensor:
    """The weight a kernel's product with activations of `dtype` multiplies, in float32: a float
    weight as it is; a quantized one dequantized and rounded once to `dtype`, as the K loop
    makes its tiles (and as the reference model's loader makes its weights)."""
    return dequantize_reference(w, dtype).float() if is_quantized(w) else w.float()
