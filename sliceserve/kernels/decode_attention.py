"""Attention of one new token per row over that row's cached keys and values.

Reads only the valid part of each row's cache slot: positions 0..position (or the last
`window` of them with sliding-window attention), whatever the cache's length. The lengths
are read from a device tensor, so a CUDA graph captured once serves every step.

Split-K ("flash decoding"): a batch of 1 has only as many (row, kv head) pairs as there
are kv heads, too few to keep a GPU busy, so each pair's keys are cut into `splits`
chunks that run in parallel; each leaves an unnormalised partial output with its running
max and sum, and a second small kernel combines them. Each program serves all the query
heads that share one kv head (grouped-query attention reads every key once).

Paged cache: with a block table, key n of row `slot` lives in block
block_table[slot, n // block_size] at offset n % block_size. Without one the cache is
(slots, kv_heads, max_len, head_dim) and a separate (constexpr) code path reads it directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sliceserve.kernels.fused_linear import dot_precision
from sliceserve.kernels.launch import launch_options, overlap_mode, wait_for_previous_kernel


@triton.jit
def decode_attention_kernel(
    q_ptr,
    keys_ptr,
    values_ptr,
    positions_ptr,
    slots_ptr,
    block_table_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    stride_q_row,
    stride_q_head,
    stride_slot,
    stride_head,
    stride_pos,
    stride_block_table,
    group,
    head_dim,
    window,
    scale,
    SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # a paged cache's positions per block: a shift and a mask, not a division
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_P2: tl.constexpr,
    PRECISION: tl.constexpr,
    OVERLAP: tl.constexpr,
):
    wait_for_previous_kernel(OVERLAP)
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(positions_ptr + row) + 1
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(length - window, 0)
    chunk = tl.cdiv(tl.cdiv(length - start, SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, length)

    g = tl.arange(0, BLOCK_H)
    heads = kv_head * group + g
    d = tl.arange(0, HEAD_P2)
    q_mask = (g[:, None] < group) & (d[None, :] < head_dim)
    q = tl.load(q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + d[None, :], mask=q_mask, other=0.0)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    base = slot * stride_slot + kv_head * stride_head
    table_row = block_table_ptr + slot * stride_block_table

    running_max = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, HEAD_P2), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (n[:, None] < hi) & (d[None, :] < head_dim)
        if HAS_TABLE:
            block = tl.load(table_row + n // BLOCK_SIZE, mask=n < hi, other=0).to(tl.int64)
            where = block * stride_slot + (n % BLOCK_SIZE) * stride_pos
            offsets = kv_head * stride_head + where[:, None] + d[None, :]
        else:
            offsets = base + n[:, None] * stride_pos + d[None, :]
        k = tl.load(keys_ptr + offsets, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where((n < hi)[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        p = tl.exp(scores - new_max[:, None])
        alpha = tl.exp(running_max - new_max)
        running_sum = running_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(values_ptr + offsets, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max

    num_heads = tl.num_programs(1) * group
    where = (row * num_heads + heads) * SPLITS + split
    h_ok = g < group
    tl.store(part_max_ptr + where, running_max, mask=h_ok)
    tl.store(part_sum_ptr + where, running_sum, mask=h_ok)
    tl.store(part_out_ptr + where[:, None] * HEAD_P2 + d[None, :], acc, mask=h_ok[:, None])


@triton.jit
def combine_splits_kernel(
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    out_ptr,
    stride_out_row,
    head_dim,
    SPLITS: tl.constexpr,
    HEAD_P2: tl.constexpr,
    OVERLAP: tl.constexpr,
):
    wait_for_previous_kernel(OVERLAP)
    row = tl.program_id(0)
    head = tl.program_id(1)
    pair = row * tl.num_programs(1) + head
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_P2)
    maxima = tl.load(part_max_ptr + pair * SPLITS + s)
    weights = tl.exp(maxima - tl.max(maxima, axis=0))  # empty splits carry -inf: weight 0
    total = tl.sum(tl.load(part_sum_ptr + pair * SPLITS + s) * weights, axis=0)
    acc = tl.load(part_out_ptr + (pair * SPLITS + s)[:, None] * HEAD_P2 + d[None, :])
    out = tl.sum(acc * weights[:, None], axis=0) / total
    tl.store(out_ptr + row * stride_out_row + head * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def choose_splits(rows: int, kv_heads: int, target_programs: int = 256) -> int:
    """Enough (row, kv head, split) programs to fill the GPU, a power of two up to 16."""
    splits = 1
    while splits < 16 and rows * kv_heads * splits < target_programs:
        splits *= 2
    return splits


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    *,
    window: int | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (M, heads, head_dim) of the token at positions (M,) in cache slots (M,); keys, values
    (slots, kv_heads, max_len, head_dim) already holding that token. Returns (M, heads * head_dim).
    With a block_table (rows, blocks_per_row) int32, keys and values are paged, (num_blocks,
    kv_heads, block_size, head_dim), and `slots` are rows of the table."""
    M, num_heads, head_dim = q.shape
    positions, slots = positions.contiguous(), slots.contiguous()  # read as flat arrays
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    splits = splits or choose_splits(M, num_kv_heads)
    head_p2 = max(16, triton.next_power_of_2(head_dim))
    part_out = torch.empty((M, num_heads, splits, head_p2), device=q.device, dtype=torch.float32)
    part_max = torch.empty((M, num_heads, splits), device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    overlap = overlap_mode(q.device)
    decode_attention_kernel[(M, num_kv_heads, splits)](
        q,
        keys,
        values,
        positions,
        slots,
        block_table if block_table is not None else slots,  # stands in; never read without a table
        part_out,
        part_max,
        part_sum,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        block_table.stride(0) if block_table is not None else 0,
        group,
        head_dim,
        window or 0,
        1.0 / math.sqrt(head_dim),
        SPLITS=splits,
        HAS_WINDOW=window is not None,
        HAS_TABLE=block_table is not None,
        BLOCK_SIZE=keys.shape[2] if block_table is not None else 1,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_P2=head_p2,
        PRECISION=dot_precision(q.dtype),
        OVERLAP=overlap,
        **launch_options(overlap),
        num_warps=4,
    )
    out = torch.empty((M, num_heads * head_dim), device=q.device, dtype=q.dtype) if out is None else out
    combine_splits_kernel[(M, num_heads)](
        part_out,
        part_max,
        part_sum,
        out,
        out.stride(0),
        head_dim,
        SPLITS=splits,
        HEAD_P2=head_p2,
        OVERLAP=overlap,
        **launch_options(overlap),
        num_warps=1,
    )
    return out


def cache_row(cache: torch.Tensor, block_table: torch.Tensor | None, slot: int, length: int) -> torch.Tensor:
    """(kv_heads, length, head_dim): positions 0..length-1 of one row of a plain or paged cache."""
    if block_table is None:
        return cache[slot, :, :length]
    block_size = cache.shape[2]
    blocks = cache[block_table[slot, : -(-length // block_size)].long()]  # only the blocks in use
    return blocks.transpose(0, 1).flatten(1, 2)[:, :length]


def decode_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    *,
    window: int | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    M, num_heads, head_dim = q.shape
    group = num_heads // keys.shape[1]
    outputs = []
    for m in range(M):
        length = int(positions[m]) + 1
        start = 0 if window is None else max(0, length - window)
        slot = int(slots[m])
        k = cache_row(keys, block_table, slot, length)[:, start:].float().repeat_interleave(group, dim=0)
        v = cache_row(values, block_table, slot, length)[:, start:].float().repeat_interleave(group, dim=0)
        outputs.append(F.scaled_dot_product_attention(q[m, :, None].float(), k, v).reshape(-1))
    return torch.stack(outputs).to(q.dtype)
