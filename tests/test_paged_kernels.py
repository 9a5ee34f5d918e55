"""The kernels over a paged KV cache against their PyTorch references.

A paged cache is built from a plain one (slots, kv_heads, capacity, head_dim): each slot's
positions are spread over shuffled blocks of a larger pool, the table is a strided view, and
every block or position no slot holds is NaN, so a read outside the table shows.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, DTYPES, poisoned, randn, relative_error, tolerance  # sets TRITON_INTERPRET first

from sliceserve.kernels.decode_attention import decode_attention, decode_attention_reference
from sliceserve.kernels.prefill_attention import attention_tiles, prefill_attention, prefill_attention_reference
from sliceserve.kernels.rope_store import rope_half_tables, rope_store, rope_store_reference


def shuffled_table(slots: int, blocks_per_row: int, generator) -> tuple[torch.Tensor, int]:
    """(table, num_blocks): distinct shuffled blocks of a pool with spares, as a strided view."""
    num_blocks = slots * blocks_per_row + 3
    blocks = torch.randperm(num_blocks, generator=generator)[: slots * blocks_per_row].view(slots, blocks_per_row)
    wide = torch.full((slots, blocks_per_row + 2), -1, dtype=torch.int32)
    wide[:, 1 : 1 + blocks_per_row] = blocks
    return wide.to(DEVICE)[:, 1 : 1 + blocks_per_row], num_blocks  # row stride != blocks_per_row


def identity_table(slots: int) -> torch.Tensor:
    """The plain cache as a paged one: a block is a whole slot."""
    return torch.arange(slots, dtype=torch.int32, device=DEVICE)[:, None]


def paged_copy(keys: torch.Tensor, values: torch.Tensor, lengths: list[int], block_size: int, generator):
    """(paged keys, paged values, table) holding positions 0..lengths[s]-1 of each slot s of the
    plain caches; NaN elsewhere."""
    slots, kv_heads, capacity, head_dim = keys.shape
    table, num_blocks = shuffled_table(slots, capacity // block_size, generator)
    shape = (num_blocks, kv_heads, block_size, head_dim)
    paged_keys, paged_values = (torch.full(shape, float("nan"), dtype=keys.dtype, device=DEVICE) for _ in range(2))
    for slot, length in enumerate(lengths):
        for position in range(length):
            block, offset = table[slot, position // block_size], position % block_size
            paged_keys[block, :, offset] = keys[slot, :, position]
            paged_values[block, :, offset] = values[slot, :, position]
    return paged_keys, paged_values, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(4, 2, 24, 24), (2, 1, 16, 0)])
@pytest.mark.parametrize("rows", [11, 29])  # a decode's program per row; a prefill's 8 rows a program, and a tail
def test_rope_store_writes_through_the_table(dtype, block_size, heads, kv_heads, head_dim, rotary_dim, rows, generator):
    slots_count, capacity = 3, 32
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, generator=generator)
    pairs = torch.randperm(slots_count * capacity, generator=generator)[:rows]  # distinct (slot, position)
    slots, positions = (pairs // capacity).to(DEVICE), (pairs % capacity).to(DEVICE)
    cos = sin = None
    if rotary_dim:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        cos, sin = rope_half_tables(inv_freq, capacity, DEVICE)
    sizes = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)

    table, num_blocks = shuffled_table(slots_count, capacity // block_size, generator)
    shape = (num_blocks, kv_heads, block_size, head_dim)
    keys, values = randn(*shape, dtype=dtype, generator=generator), randn(*shape, dtype=dtype, generator=generator)
    ref_keys, ref_values = keys.clone(), values.clone()
    q = rope_store(qkv, positions, slots, keys, values, cos, sin, **sizes, block_table=table)
    expected_q = rope_store_reference(qkv, positions, slots, ref_keys, ref_values, cos, sin, **sizes, block_table=table)
    assert relative_error(q, expected_q) < tolerance(dtype)
    assert relative_error(keys, ref_keys) < tolerance(dtype)
    assert torch.equal(values, ref_values)  # copied, not computed: exactly where the reference writes

    # No table is today's plain cache, and the identity table reproduces it bit for bit.
    shape = (slots_count, kv_heads, capacity, head_dim)
    keys, values = randn(*shape, dtype=dtype, generator=generator), randn(*shape, dtype=dtype, generator=generator)
    plain_keys, plain_values, ref_keys, ref_values = keys.clone(), values.clone(), keys.clone(), values.clone()
    q_plain = rope_store(qkv, positions, slots, plain_keys, plain_values, cos, sin, **sizes)
    expected_q = rope_store_reference(qkv, positions, slots, ref_keys, ref_values, cos, sin, **sizes)
    assert relative_error(q_plain, expected_q) < tolerance(dtype)
    assert relative_error(plain_keys, ref_keys) < tolerance(dtype) and torch.equal(plain_values, ref_values)
    q_identity = rope_store(
        qkv, positions, slots, keys, values, cos, sin, **sizes, block_table=identity_table(slots_count)
    )
    assert torch.equal(q_identity, q_plain) and torch.equal(keys, plain_keys) and torch.equal(values, plain_values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(4, 2, 24, None), (2, 2, 16, None), (4, 2, 16, 21)])
def test_decode_attention_reads_through_the_table(dtype, heads, kv_heads, head_dim, window, generator):
    slots_count, capacity, block_size = 6, 80, 16
    positions = torch.tensor([0, 15, 16, 47, 79, 33])  # on both sides of block boundaries
    rows = len(positions)
    q = randn(rows, heads, head_dim, dtype=dtype, generator=generator)
    shape = (slots_count, kv_heads, capacity, head_dim)
    keys, values = randn(*shape, dtype=dtype, generator=generator), randn(*shape, dtype=dtype, generator=generator)
    slots = torch.randperm(slots_count, generator=generator)[:rows]
    lengths = [0] * slots_count
    for slot, position in zip(slots.tolist(), positions.tolist()):
        lengths[slot] = position + 1
    paged_keys, paged_values, table = paged_copy(keys, values, lengths, block_size, generator)
    positions, slots = positions.to(DEVICE), slots.to(DEVICE)

    expected = decode_attention_reference(q, keys, values, positions, slots, window=window)
    paged_expected = decode_attention_reference(
        q, paged_keys, paged_values, positions, slots, window=window, block_table=table
    )
    assert torch.equal(paged_expected, expected)
    for splits, block_n in ((1, 16), (4, 16), (4, 32)):
        out = decode_attention(
            q,
            paged_keys,
            paged_values,
            positions,
            slots,
            window=window,
            splits=splits,
            block_n=block_n,
            block_table=table,
            out=poisoned((rows, heads * head_dim), dtype),
        )
        assert relative_error(out, expected) < tolerance(dtype)
        plain = decode_attention(q, keys, values, positions, slots, window=window, splits=splits, block_n=block_n)
        identity = decode_attention(
            q,
            keys,
            values,
            positions,
            slots,
            window=window,
            splits=splits,
            block_n=block_n,
            block_table=identity_table(slots_count),
        )
        assert torch.equal(identity, plain)


def test_attention_tiles_cut_segments_into_block_m_rows():
    segments = [(0, 5, 2, 0), (5, 6, 0, 40), (6, 13, 1, 3)]
    tiles = attention_tiles(segments, 4, "cpu")
    assert tiles.dtype == torch.int32
    assert tiles.tolist() == [[0, 4, 2, 0], [4, 1, 2, 4], [5, 1, 0, 40], [6, 4, 1, 3], [10, 3, 1, 7]]
    assert attention_tiles([], 4, "cpu").shape == (0, 4)


# (start, end, slot, first): a fresh prompt, a decode row, a chunk after a cached prefix, a
# decode row near the end of its slot, a short prompt; row 67 belongs to no segment.
SEGMENTS = [(0, 37, 2, 0), (37, 38, 0, 45), (38, 61, 3, 20), (61, 62, 1, 70), (62, 67, 4, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 80])  # 80 = capacity: the identity table
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(4, 2, 16, None), (3, 1, 24, 11), (2, 2, 32, None)])
def test_prefill_attention_of_mixed_segments(dtype, block_size, heads, kv_heads, head_dim, window, generator):
    slots_count, capacity, rows = 5, 80, 68
    q = randn(rows, heads, head_dim, dtype=dtype, generator=generator)
    shape = (slots_count, kv_heads, capacity, head_dim)
    keys, values = randn(*shape, dtype=dtype, generator=generator), randn(*shape, dtype=dtype, generator=generator)
    lengths = [0] * slots_count
    for start, end, slot, first in SEGMENTS:
        lengths[slot] = first + end - start
    if block_size == capacity:
        table = identity_table(slots_count)
        for slot, length in enumerate(lengths):  # beyond each slot's last position: garbage
            keys[slot, :, length:] = float("nan")
            values[slot, :, length:] = float("nan")
    else:
        keys, values, table = paged_copy(keys, values, lengths, block_size, generator)

    expected = prefill_attention_reference(q, keys, values, table, SEGMENTS, window=window)
    assert torch.isfinite(expected).all()
    for block_m, block_n in ((16, 16), (16, 32), (32, 16)):  # 32 rows over 16 keys: a row may see none at first
        tiles = attention_tiles(SEGMENTS, block_m, DEVICE)
        out = poisoned((rows, heads * head_dim), dtype)
        prefill_attention(q, keys, values, table, tiles, window=window, block_m=block_m, block_n=block_n, out=out)
        assert relative_error(out[:67], expected[:67]) < tolerance(dtype)
        assert out[67].isnan().all()  # no tile covers it: left as it was


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_of_one_fresh_prompt_is_causal_attention(dtype, generator):
    heads, kv_heads, head_dim, length, block_size = 4, 2, 16, 37, 16
    q = randn(length, heads, head_dim, dtype=dtype, generator=generator)
    k = randn(1, kv_heads, 48, head_dim, dtype=dtype, generator=generator)
    v = randn(1, kv_heads, 48, head_dim, dtype=dtype, generator=generator)
    keys, values, table = paged_copy(k, v, [length], block_size, generator)
    tiles = attention_tiles([(0, length, 0, 0)], 16, DEVICE)
    out = prefill_attention(q, keys, values, table, tiles, block_m=16, block_n=16)
    expected = F.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        k[0, :, :length].float().repeat_interleave(2, dim=0),
        v[0, :, :length].float().repeat_interleave(2, dim=0),
        is_causal=True,
    )
    assert relative_error(out, expected.transpose(0, 1).reshape(length, -1)) < tolerance(dtype)
