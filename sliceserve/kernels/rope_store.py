"""Rotary embedding of queries and keys, and the write of keys and values into the cache.

Input: the fused q|k|v projection of M tokens, each with its own position and KV-cache
slot. Output: rotated queries (M, heads, head_dim); rotated keys and the values land at
(slot, kv_head, position) of the layer's cache, or in a paged cache at
(block_table[slot, position // block_size], kv_head, position % block_size). One program
per (token, head) in a decode step, per (8 tokens, head) in a prefill: the same kernel for
both. Partial rotary (Phi-2) rotates the first `rotary_dim` features of each head and passes
the rest through; without rope (OPT) everything passes through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sliceserve.kernels.launch import launch_options, overlap_mode, wait_for_previous_kernel


@triton.jit
def rotate_head(
    src_ptr,
    dst_ptr,
    cos_ptr,
    sin_ptr,
    head_dim,
    rot_half,
    HAS_ROPE: tl.constexpr,
    HALF_P2: tl.constexpr,
    HEAD_P2: tl.constexpr,
):
    d = tl.arange(0, HEAD_P2)
    if HAS_ROPE:
        i = tl.arange(0, HALF_P2)
        ok = i < rot_half
        x1 = tl.load(src_ptr + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src_ptr + rot_half + i, mask=ok, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + i, mask=ok, other=0.0)
        sin = tl.load(sin_ptr + i, mask=ok, other=0.0)
        tl.store(dst_ptr + i, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=ok)
        tl.store(dst_ptr + rot_half + i, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=ok)
        rest = (d >= 2 * rot_half) & (d < head_dim)
    else:
        rest = d < head_dim
    tl.store(dst_ptr + d, tl.load(src_ptr + d, mask=rest, other=0.0), mask=rest)


@triton.jit
def rope_store_kernel(
    qkv_ptr,
    q_ptr,
    keys_ptr,
    values_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    slots_ptr,
    block_table_ptr,
    stride_qkv,
    stride_q,
    stride_cache_slot,
    stride_cache_head,
    stride_cache_pos,
    stride_table,
    stride_block_table,
    num_heads,
    num_kv_heads,
    head_dim,
    rot_half,
    block_size,
    total_rows,
    HAS_ROPE: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    HALF_P2: tl.constexpr,
    HEAD_P2: tl.constexpr,
    OVERLAP: tl.constexpr,
    ROWS: tl.constexpr,
):
    wait_for_previous_kernel(OVERLAP)
    j = tl.program_id(1)  # 0..heads-1: a query head; then the key/value heads
    for r in tl.static_range(ROWS):
        m = tl.program_id(0) * ROWS + r
        if m < total_rows:
            position = tl.load(positions_ptr + m)
            cos_row = cos_ptr + position * stride_table
            sin_row = sin_ptr + position * stride_table
            row = qkv_ptr + m * stride_qkv
            if j < num_heads:
                rotate_head(
                    row + j * head_dim,
                    q_ptr + m * stride_q + j * head_dim,
                    cos_row,
                    sin_row,
                    head_dim,
                    rot_half,
                    HAS_ROPE,
                    HALF_P2,
                    HEAD_P2,
                )
            else:
                h = j - num_heads
                slot = tl.load(slots_ptr + m)
                if HAS_TABLE:
                    block = tl.load(block_table_ptr + slot * stride_block_table + position // block_size).to(tl.int64)
                    where = (
                        block * stride_cache_slot + h * stride_cache_head + (position % block_size) * stride_cache_pos
                    )
                else:
                    where = slot * stride_cache_slot + h * stride_cache_head + position * stride_cache_pos
                rotate_head(
                    row + (num_heads + h) * head_dim,
                    keys_ptr + where,
                    cos_row,
                    sin_row,
                    head_dim,
                    rot_half,
                    HAS_ROPE,
                    HALF_P2,
                    HEAD_P2,
                )
                d = tl.arange(0, HEAD_P2)
                ok = d < head_dim
                v = tl.load(row + (num_heads + num_kv_heads + h) * head_dim + d, mask=ok, other=0.0)
                tl.store(values_ptr + where + d, v, mask=ok)


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_out: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotated queries (M, heads, head_dim). qkv (M, (heads + 2 kv_heads) * head_dim);
    positions, slots (M,); keys, values (slots, kv_heads, max_len, head_dim), written in place;
    cos, sin (max_positions, rotary_dim / 2) in float32, or None without rope. With a
    block_table (rows, blocks_per_row) int32, keys and values are paged, (num_blocks, kv_heads,
    block_size, head_dim), and `slots` are rows of the table."""
    M = qkv.shape[0]
    positions, slots = positions.contiguous(), slots.contiguous()  # read as flat arrays
    q = torch.empty((M, num_heads, head_dim), device=qkv.device, dtype=qkv.dtype) if q_out is None else q_out
    rot_half = cos.shape[1] if cos is not None else 0
    table = cos if cos is not None else q  # stands in; never read without rope
    overlap = overlap_mode(qkv.device)
    rows = 1 if M <= PREFILL_FROM_ROWS else ROWS_PER_PREFILL_PROGRAM
    rope_store_kernel[(triton.cdiv(M, rows), num_heads + num_kv_heads)](
        qkv,
        q,
        keys,
        values,
        table,
        sin if sin is not None else table,
        positions,
        slots,
        block_table if block_table is not None else slots,  # stands in; never read without a table
        qkv.stride(0),
        q.stride(0),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        cos.stride(0) if cos is not None else 0,
        block_table.stride(0) if block_table is not None else 0,
        num_heads,
        num_kv_heads,
        head_dim,
        rot_half,
        keys.shape[2],
        M,
        HAS_ROPE=cos is not None,
        HAS_TABLE=block_table is not None,
        HALF_P2=triton.next_power_of_2(max(rot_half, 1)),
        HEAD_P2=triton.next_power_of_2(head_dim),
        OVERLAP=overlap,
        ROWS=rows,
        **launch_options(overlap),
        num_warps=1,
    )
    return q


# A decode step's few rows get a program per (row, head); a prefill's thousands of rows would
# then launch hundreds of thousands of one-warp programs (80 us a layer for 2048 tokens on an
# H200), so each prefill program takes several rows of one head.
PREFILL_FROM_ROWS = 16
ROWS_PER_PREFILL_PROGRAM = 8


def rope_half_tables(inv_freq: torch.Tensor, max_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inverse frequency, (max_positions, rotary_dim / 2), float32,
    computed exactly as model/rope.py computes its tables."""
    positions = torch.arange(max_positions, device=device).to(torch.float32)
    angles = positions[:, None] * inv_freq.to(device, torch.float32)
    return angles.cos().contiguous(), angles.sin().contiguous()


def rope_store_reference(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    M = qkv.shape[0]
    heads = qkv.view(M, num_heads + 2 * num_kv_heads, head_dim).float()
    q, k, v = heads.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if cos is not None:
        half = cos.shape[1]
        c, s = cos[positions][:, None], sin[positions][:, None]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)

        q, k = rotate(q), rotate(k)
    for m in range(M):
        block, offset = int(slots[m]), int(positions[m])
        if block_table is not None:
            block_size = keys.shape[2]
            block, offset = int(block_table[block, offset // block_size]), offset % block_size
        keys[block, :, offset] = k[m].to(keys.dtype)
        values[block, :, offset] = v[m].to(values.dtype)
    return q.to(qkv.dtype)
