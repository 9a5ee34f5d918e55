"""Products with quantized weights: the K loop that dequantizes inside the product, and the
dequantization alone (for prefill, where the library's product is faster).

A quantized weight (model/quantized.py's QuantizedWeight; read here by its attributes: this
layer may not import the model's) stores, per output row n and group g of `group_size` inputs:
    8 bits: int8 codes q,                    w[n, k] = q[n, k] * s[n, g]
    4 bits: two codes a byte (even k low),   w[n, k] = (q[n, k] - z[n, g]) * s[n, g]
Within one group the scale and zero point are constants of the column, so a part of the
product that stays inside a group is
    sum_k a[m, k] w[n, k] = s[n, g] * (sum_k a[m, k] q[n, k] - z[n, g] * sum_k a[m, k]):
the codes go into the matrix units as they are (integers up to 127 are exact in fp16 and
bf16), and the scale and zero point are applied to the (rows, columns) result of each group,
never to the weight tile. For 4 bits the activations are split into even and odd columns,
which meet the low and high nibbles: the packed bytes are never interleaved.

Each step of the main loop reads `step` inputs, `tiles.block_k * 16 / bits` (no more than the
inputs' next power of two): as many weight bytes per column tile as a 16-bit product of the
same tiles. A step holds step / group_size groups, unrolled, or lies inside one: group sizes
are powers of two, at least 16 (8 bits) or 32 (4 bits: each half then spans 16 inputs, the
matrix units' minimum). Other group sizes are refused (the fast path dequantizes those).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

FLOAT_WEIGHT = 16  # the "bits" of a float weight: multiplied as stored
MIN_GROUP = {8: 16, 4: 32}


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
        """Inputs per step of the main loop (see the module docstring): for codes, no more than
        the inputs' next power of two (parts of a step past the inputs are wasted work)."""
        if self.bits == FLOAT_WEIGHT:
            return block_k
        step = min(block_k * FLOAT_WEIGHT // self.bits, triton.next_power_of_2(self.inputs))
        return max(step, MIN_GROUP[self.bits])

    def part(self, block_k: int) -> int:
        """Inputs per group-sized part of a step (the whole step for float weights)."""
        step = self.step(block_k)
        return step if self.bits == FLOAT_WEIGHT else min(step, self.group)

    def stage_bytes(self, block_m: int, block_n: int, block_k: int, element_size: int) -> int:
        """Shared memory one pipeline stage of this product takes: its activation and weight tiles."""
        step = self.step(block_k)
        weight_bits = element_size * 8 if self.bits == FLOAT_WEIGHT else self.bits
        return block_m * step * element_size + block_n * step * weight_bits // 8


def is_quantized(w) -> bool:
    return w is not None and not isinstance(w, torch.Tensor)


def supports_quantized(w) -> bool:
    """Whether the kernels multiply this quantized weight (else: dequantize it first)."""
    group = w.group_size
    return w.bits in MIN_GROUP and group >= MIN_GROUP[w.bits] and group & (group - 1) == 0


def weight_operand(w) -> WeightOperand:
    """A float weight (N, K) or a quantized one, checked and described for a kernel launch."""
    if not is_quantized(w):
        return WeightOperand(w, None, None, FLOAT_WEIGHT, 1, w.shape[1], w.stride(0), 0)
    if not supports_quantized(w):
        raise ValueError(
            f"{w.bits}-bit groups of {w.group_size}: the kernels take powers of two from {MIN_GROUP.get(w.bits)}"
        )
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
def load_activation_parts(
    a_ptr, stride_a, offs_m, M, K, k0, BLOCK_M: tl.constexpr, STEP: tl.constexpr, BITS: tl.constexpr
):
    """a[:, k0 : k0 + STEP] (zeros outside a), as the weights' codes meet it: whole for 8 bits;
    for 4 bits its even and odd columns (loaded whole, split in registers)."""
    k = k0 + tl.arange(0, STEP)
    a = tl.load(
        a_ptr + offs_m[:, None] * stride_a + k[None, :], mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0
    )
    low = a
    high = a
    if BITS == 4:
        low, high = tl.split(tl.reshape(a, (BLOCK_M, STEP // 2, 2)))
    return low, high


@triton.jit
def dequantized_part(
    low,
    high,
    q_ptr,
    stride_q,
    s_ptr,
    z_ptr,
    stride_s,
    offs_n,
    N,
    K,
    k0,
    GROUP: tl.constexpr,
    STEP: tl.constexpr,
    BITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) float32: a[:, k0 : k0 + STEP] @ w[offs_n, k0 : k0 + STEP].T for a
    part inside one group (`low`, `high` from load_activation_parts)."""
    n_ok = offs_n < N
    # A step's last parts may lie past the inputs (their products are zeros): read the last
    # group's scales there rather than past the row.
    g = tl.minimum(k0, K - 1) // GROUP
    scale = tl.load(s_ptr + offs_n * stride_s + g, mask=n_ok, other=0.0).to(tl.float32)
    if BITS == 8:
        k = k0 + tl.arange(0, STEP)
        q = tl.load(q_ptr + offs_n[None, :] * stride_q + k[:, None], mask=n_ok[None, :] & (k[:, None] < K), other=0)
        part = tl.dot(low, q.to(low.dtype), input_precision=PRECISION)
    else:
        j = k0 // 2 + tl.arange(0, STEP // 2)  # the bytes holding inputs 2j (low nibble) and 2j + 1
        packed = tl.load(
            q_ptr + offs_n[None, :] * stride_q + j[:, None], mask=n_ok[None, :] & (2 * j[:, None] < K), other=0
        )
        part = tl.dot(low, (packed & 15).to(low.dtype), input_precision=PRECISION)
        part = tl.dot(high, (packed >> 4).to(low.dtype), part, input_precision=PRECISION)
        zero = tl.load(z_ptr + offs_n * stride_s + g, mask=n_ok, other=0).to(tl.float32)
        sums = tl.sum(low.to(tl.float32), axis=1) + tl.sum(high.to(tl.float32), axis=1)
        part = part - sums[:, None] * zero[None, :]
    return part * scale[None, :]


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
    PART: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + a @ w.T over all K inputs, STEP inputs a step, in parts of PART (<= GROUP) inputs."""
    for k0 in range(0, K, STEP):
        for i in tl.static_range(STEP // PART):
            low, high = load_activation_parts(a_ptr, stride_a, offs_m, M, K, k0 + i * PART, BLOCK_M, PART, BITS)
            acc += dequantized_part(
                low,
                high,
                q_ptr,
                stride_q,
                s_ptr,
                z_ptr,
                stride_s,
                offs_n,
                N,
                K,
                k0 + i * PART,
                GROUP,
                PART,
                BITS,
                PRECISION,
            )
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
    PART: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Two products of the same activations x with two weights of one format (gate and up)."""
    for k0 in range(0, K, STEP):
        for i in tl.static_range(STEP // PART):
            k = k0 + i * PART
            low, high = load_activation_parts(x_ptr, stride_x, offs_m, M, K, k, BLOCK_M, PART, BITS)
            acc_a += dequantized_part(
                low, high, qa_ptr, stride_q, sa_ptr, za_ptr, stride_s, offs_n, N, K, k, GROUP, PART, BITS, PRECISION
            )
            acc_b += dequantized_part(
                low, high, qb_ptr, stride_q, sb_ptr, zb_ptr, stride_s, offs_n, N, K, k, GROUP, PART, BITS, PRECISION
            )
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
