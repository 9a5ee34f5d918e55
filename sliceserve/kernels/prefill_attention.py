"""Causal attention of a flat prefill batch over a paged KV cache, many requests in one launch.

The batch q (M, heads, head_dim) holds consecutive rows for several requests ("segments"):
rows start..end-1 belong to table row `slot` and sit at positions first..first+(end-start)-1,
whose keys and values rope_store has already written. A segment is a whole prompt (first = 0),
a chunk continuing a cached prefix (first > 0) or a single decode token. The query row at
position p attends to its slot's keys at positions max(0, p - window + 1) (0 without a
window) through p; key n lives in block block_table[slot, n // block_size] at offset
n % block_size.

Segments are cut on the host into tiles of at most BLOCK_M rows (`attention_tiles`, once a
step for every layer). The grid is (tiles, query heads): one head per program, not the GQA
group folded into the tile, so a tile is BLOCK_M rows whatever the model's group (3 and 7
included, with no padding to a power of two) and the tiles serve every model alike. The
price is that each key block is read once per query head of its group; prefill is bound by
the products, and the repeats mostly come from L2. A program runs a flash-style online
softmax in float32 over key blocks of BLOCK_N, from the window start of its first row to its
last row's position: only the blocks some row of the tile needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sliceserve.kernels.decode_attention import cache_row
from sliceserve.kernels.fused_linear import dot_precision
from sliceserve.kernels.launch import launch_options, overlap_mode, wait_for_previous_kernel
from sliceserve.uploads import upload


@triton.jit
def prefill_attention_kernel(
    q_ptr,
    keys_ptr,
    values_ptr,
    block_table_ptr,
    tiles_ptr,
    out_ptr,
    stride_q_row,
    stride_q_head,
    stride_block,
    stride_head,
    stride_pos,
    stride_block_table,
    stride_out_row,
    group,
    head_dim,
    block_size,
    window,
    scale,
    HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_P2: tl.constexpr,
    PRECISION: tl.constexpr,
    OVERLAP: tl.constexpr,
):
    wait_for_previous_kernel(OVERLAP)
    tile = tl.program_id(0)
    head = tl.program_id(1)
    row_start = tl.load(tiles_ptr + tile * 4)
    rows = tl.load(tiles_ptr + tile * 4 + 1)
    slot = tl.load(tiles_ptr + tile * 4 + 2).to(tl.int64)
    first = tl.load(tiles_ptr + tile * 4 + 3)
    kv_head = head // group

    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_P2)
    row_ok = m < rows
    d_ok = d < head_dim
    q_rows = q_ptr + (row_start + m)[:, None] * stride_q_row + head * stride_q_head
    q = tl.load(q_rows + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Rows past the tile's end take its last row's position: never stored, and never without a key.
    query_pos = first + tl.minimum(m, rows - 1)
    hi = first + rows
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first - window + 1, 0)
    table_row = block_table_ptr + slot * stride_block_table

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_P2), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        block = tl.load(table_row + n // block_size, mask=n_ok, other=0).to(tl.int64)
        offsets = kv_head * stride_head + (block * stride_block + (n % block_size) * stride_pos)[:, None] + d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(keys_ptr + offsets, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = n[None, :] <= query_pos[:, None]
        if HAS_WINDOW:
            visible = visible & (n[None, :] > query_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A row whose window starts past this block has seen no key yet: subtract 0, not -inf.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(scores - safe_max[:, None])
        alpha = tl.exp(running_max - safe_max)
        running_sum = running_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(values_ptr + offsets, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max

    out = acc / running_sum[:, None]
    out_rows = out_ptr + (row_start + m)[:, None] * stride_out_row + head * head_dim
    tl.store(out_rows + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def tile_rows(segments: list[tuple[int, int, int, int]], block_m: int) -> list[tuple[int, int, int, int]]:
    """Per query tile (row_start, rows, slot, first_position): each segment (start, end, slot,
    first) cut into tiles of at most block_m rows."""
    return [
        (row, min(block_m, end - row), slot, first + row - start)
        for start, end, slot, first in segments
        for row in range(start, end, block_m)
    ]


def attention_tiles(segments: list[tuple[int, int, int, int]], block_m: int, device) -> torch.Tensor:
    """tile_rows as a (T, 4) int32 tensor on `device`: built once per step on the host and
    shared by every layer."""
    return upload(tile_rows(segments, block_m), device, torch.int32).reshape(-1, 4)


def prefill_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_table: torch.Tensor,
    tiles: torch.Tensor,
    *,
    window: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(M, heads * head_dim) in q's dtype; rows not covered by any tile are left as they were in `out`
    (or uninitialised). q (M, heads, head_dim); keys, values (num_blocks, kv_heads, block_size,
    head_dim); block_table (rows, blocks_per_row) int32; tiles from attention_tiles(..., block_m)."""
    M, num_heads, head_dim = q.shape
    group = num_heads // keys.shape[1]
    out = torch.empty((M, num_heads * head_dim), device=q.device, dtype=q.dtype) if out is None else out
    if tiles.shape[0] == 0:
        return out
    overlap = overlap_mode(q.device)
    prefill_attention_kernel[(tiles.shape[0], num_heads)](
        q,
        keys,
        values,
        block_table,
        tiles.contiguous(),  # read as a flat array
        out,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        block_table.stride(0),
        out.stride(0),
        group,
        head_dim,
        keys.shape[2],
        window or 0,
        1.0 / math.sqrt(head_dim),
        HAS_WINDOW=window is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_P2=max(16, triton.next_power_of_2(head_dim)),
        PRECISION=dot_precision(q.dtype),
        OVERLAP=overlap,
        **launch_options(overlap),
        num_warps=4,
    )
    return out


def prefill_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_table: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    *,
    window: int | None = None,
) -> torch.Tensor:
    """PyTorch, float32 math: gather each segment's keys through the table, masked softmax attention.
    Rows outside every segment are zero."""
    M, num_heads, head_dim = q.shape
    group = num_heads // keys.shape[1]
    out = torch.zeros((M, num_heads, head_dim), device=q.device, dtype=torch.float32)
    for start, end, slot, first in segments:
        length = first + end - start
        k = cache_row(keys, block_table, slot, length).float().repeat_interleave(group, dim=0)
        v = cache_row(values, block_table, slot, length).float().repeat_interleave(group, dim=0)
        query_pos = torch.arange(first, length, device=q.device)[:, None]
        key_pos = torch.arange(length, device=q.device)[None, :]
        visible = key_pos <= query_pos
        if window is not None:
            visible &= key_pos > query_pos - window
        segment_q = q[start:end].float().transpose(0, 1)  # (heads, rows, head_dim)
        out[start:end] = F.scaled_dot_product_attention(segment_q, k, v, attn_mask=visible).transpose(0, 1)
    return out.reshape(M, num_heads * head_dim).to(q.dtype)
