"""Every Triton kernel against its PyTorch reference, on odd shapes and batch sizes.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from kernel_support import DEVICE, DTYPES, poisoned, randn, relative_error, tolerance  # sets TRITON_INTERPRET first

from sliceserve.fast.library_matmul import library_gated, stacked_rows
from sliceserve.kernels import launch
from sliceserve.kernels.decode_attention import decode_attention, decode_attention_reference
from sliceserve.kernels.fused_linear import (
    DECODE_TILES,
    MIDDLE_TILES,
    TileConfig,
    fused_linear,
    fused_linear_reference,
)
from sliceserve.kernels.gated_activation import gated_activation, gated_activation_reference
from sliceserve.kernels.gated_linear import gated_linear, gated_linear_reference
from sliceserve.kernels.rms_norm import rms_norm, rms_norm_reference
from sliceserve.kernels.rope_store import rope_half_tables, rope_store, rope_store_reference
from sliceserve.kernels.shortcut import row_scale, shortcut_step, shortcut_step_reference

ROWS = [1, 3, 17]
SMALL_PREFILL = TileConfig(block_m=32, block_n=32, block_k=32)  # prefill-style tiles at test sizes
TILES = {"decode": DECODE_TILES, "middle": MIDDLE_TILES, "prefill": SMALL_PREFILL}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_divides_by_the_original_width(dtype, rows, generator):
    x = randn(rows, 72, dtype=dtype, generator=generator)
    out = rms_norm(x, 96, 1e-5)
    assert relative_error(out, rms_norm_reference(x, 96, 1e-5)) < tolerance(dtype)
    expected = x.double() / (x.double().pow(2).sum(-1, keepdim=True) / 96 + 1e-5).sqrt()
    assert relative_error(out, expected) < tolerance(dtype)
    assert relative_error(rms_norm(x, 96, 1e-5, sumsq_only=True), x.double().pow(2).sum(-1, keepdim=True)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("variant", ["decode", "prefill"])
def test_shortcut_step_and_its_norm(dtype, rows, variant, generator):
    d_in, d_out = 88, 72  # not powers of two, not multiples of the tiles
    x = randn(rows, d_in, dtype=dtype, generator=generator)
    shortcut = randn(d_out, d_in, dtype=dtype, scale=d_in**-0.5, generator=generator)
    y = randn(rows, d_out, dtype=dtype, generator=generator)
    out = poisoned((rows, d_out), dtype)
    x_new, partials = shortcut_step(x, shortcut, y, tiles=TILES[variant], out=out)
    expected, sumsq = shortcut_step_reference(x, shortcut, y)
    assert relative_error(x_new, expected) < tolerance(dtype)
    assert relative_error(x_new, x.double() @ shortcut.double().T + y.double()) < tolerance(dtype)
    assert partials.shape == (rows, -(-d_out // TILES[variant].block_n))
    assert relative_error(row_scale(partials, 96, 1e-5), row_scale(sumsq, 96, 1e-5)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("variant", ["decode", "middle", "prefill"])
def test_fused_linear_with_norm_second_product_bias_activation_residual(dtype, rows, variant, generator):
    k, k2, n = 56, 40, 104
    a = randn(rows, k, dtype=dtype, generator=generator)
    partials = a.float().pow(2).reshape(rows, 4, -1).sum(-1)  # as if four tiles had written a
    w = randn(n, k, dtype=dtype, scale=k**-0.5, generator=generator)
    a2 = randn(rows, k2, dtype=dtype, generator=generator)
    w2 = randn(n, k2, dtype=dtype, scale=k2**-0.5, generator=generator)
    bias = randn(n, dtype=dtype, generator=generator)
    residual = randn(rows, n, dtype=dtype, generator=generator)
    for options in (
        dict(norm=(partials, 64, 1e-6)),
        dict(norm=(partials, 64, 1e-6), bias=bias, activation="gelu_tanh"),
        dict(bias=bias, activation="relu", residual=residual, sumsq=True),
        dict(a2=a2, w2=w2, bias=bias, residual=residual, sumsq=True),
        dict(norm=(partials, 64, 1e-6), a2=a2, w2=w2, sumsq=True, activation="gelu"),
    ):
        out, sums = fused_linear(a, w, tiles=TILES[variant], out=poisoned((rows, n), dtype), **options)
        expected, expected_sums = fused_linear_reference(a, w, **options)
        assert relative_error(out, expected) < tolerance(dtype), options.keys()
        if expected_sums is not None:
            assert relative_error(sums.sum(-1, keepdim=True), expected_sums) < 1e-5


@pytest.mark.parametrize("mode", list(launch.OVERLAP_MODES))
def test_a_chain_of_kernels_launched_early_still_reads_its_inputs(mode, monkeypatch, generator):
    """With programmatic dependent launch (Hopper GPUs) each kernel starts before the previous
    one ends and must wait before reading: a chain of dependent kernels, each consuming the
    last one's output and sums of squares, still computes the reference. Elsewhere the mode
    falls back to ordinary launches."""
    monkeypatch.setattr(launch, "OVERLAP", launch.OVERLAP_MODES[mode])
    device = torch.device(DEVICE)
    hopper = device.type == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert launch.overlap_mode(device) == (launch.OVERLAP_MODES[mode] if hopper else launch.OVERLAP_OFF)
    dtype = DTYPES[-1]
    width, inter = 80, 112
    x = randn(3, width, dtype=dtype, generator=generator)
    s = randn(width, width, dtype=dtype, scale=width**-0.5, generator=generator)
    gate = randn(inter, width, dtype=dtype, scale=width**-0.5, generator=generator)
    up = randn(inter, width, dtype=dtype, scale=width**-0.5, generator=generator)
    down = randn(width, inter, dtype=dtype, scale=inter**-0.5, generator=generator)
    partials = rms_norm(x, 96, 1e-5, sumsq_only=True)
    act = gated_linear(x, gate, up, norm=(partials, 96, 1e-5))
    out, sums = fused_linear(x, s, a2=act, w2=down, sumsq=True)
    expected_act = gated_linear_reference(x, gate, up, norm=(x.float().pow(2).sum(-1, keepdim=True), 96, 1e-5))
    expected, expected_sums = fused_linear_reference(x, s, a2=expected_act, w2=down, sumsq=True)
    assert relative_error(out, expected) < 2 * tolerance(dtype)
    assert relative_error(sums.sum(-1, keepdim=True), expected_sums) < 2 * tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_linear(dtype, rows, activation, generator):
    k, n = 72, 88
    a = randn(rows, k, dtype=dtype, generator=generator)
    partials = a.float().pow(2).sum(-1, keepdim=True)
    gate = randn(n, k, dtype=dtype, scale=k**-0.5, generator=generator)
    up = randn(n, k, dtype=dtype, scale=k**-0.5, generator=generator)
    biases = dict(
        gate_bias=randn(n, dtype=dtype, generator=generator), up_bias=randn(n, dtype=dtype, generator=generator)
    )
    for options in (dict(norm=(partials, 96, 1e-5)), dict(norm=(partials, 96, 1e-5), **biases), {}):
        out = gated_linear(a, gate, up, activation=activation, out=poisoned((rows, n), dtype), **options)
        expected = gated_linear_reference(a, gate, up, activation=activation, **options)
        assert relative_error(out, expected) < tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_gated_activation_reads_two_halves_of_one_product(dtype, activation, generator):
    n = 1100  # more than one program's columns, and ragged
    products = randn(5, 2 * n, dtype=dtype, generator=generator)
    gate, up = products[:, :n], products[:, n:]
    out = gated_activation(gate, up, activation)
    assert relative_error(out, gated_activation_reference(gate, up, activation)) < tolerance(dtype)
    gate_bias, up_bias = randn(n, dtype=dtype, generator=generator), randn(n, dtype=dtype, generator=generator)
    out = gated_activation(gate, up, activation, gate_bias, up_bias)
    expected = gated_activation_reference(gate, up, activation, gate_bias, up_bias)
    assert relative_error(out, expected) < tolerance(dtype)
    with pytest.raises(ValueError, match="both biases"):
        gated_activation(gate, up, activation, gate_bias)


def test_the_library_multiplies_stacked_gate_and_up_as_one_product(generator):
    """Views of one (2N, K) tensor are found stacked; separate tensors are not; both ways give
    the reference's gated product."""
    k, n = 40, 24
    both = randn(2 * n, k, dtype=torch.float32, scale=k**-0.5, generator=generator)
    gate, up = both[:n], both[n:]
    assert stacked_rows(gate, up).data_ptr() == both.data_ptr()
    assert stacked_rows(up, gate) is None and stacked_rows(gate.clone(), up.clone()) is None
    a = randn(33, k, dtype=torch.float32, generator=generator)
    partials = a.pow(2).sum(-1, keepdim=True)
    expected = gated_linear_reference(a, gate, up, activation="silu", norm=(partials, 48, 1e-5))
    for g, u in ((gate, up), (gate.clone(), up.clone())):
        out = library_gated(a, g, u, activation="silu", norm=(partials, 48, 1e-5))
        assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(4, 2, 24, 24), (3, 3, 40, 16), (2, 1, 32, 0)])
def test_rope_store(dtype, rows, heads, kv_heads, head_dim, rotary_dim, generator):
    slots_count, max_len = 5, 40
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, generator=generator)
    positions = torch.randint(0, max_len, (rows,), generator=generator).to(DEVICE)
    slots = torch.randint(0, slots_count, (rows,), generator=generator).to(DEVICE)
    if rows > 1:  # distinct (slot, position) pairs: the writes must not overlap
        positions = torch.randperm(max_len, generator=generator)[:rows].to(DEVICE)
    cos = sin = None
    if rotary_dim:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        cos, sin = rope_half_tables(inv_freq, max_len, DEVICE)
    shape = (slots_count, kv_heads, max_len, head_dim)
    keys, values = randn(*shape, dtype=dtype, generator=generator), randn(*shape, dtype=dtype, generator=generator)
    ref_keys, ref_values = keys.clone(), values.clone()
    sizes = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    q = rope_store(qkv, positions, slots, keys, values, cos, sin, **sizes)
    expected_q = rope_store_reference(qkv, positions, slots, ref_keys, ref_values, cos, sin, **sizes)
    assert relative_error(q, expected_q) < tolerance(dtype)
    assert relative_error(keys, ref_keys) < tolerance(dtype)
    assert torch.equal(values, ref_values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(4, 2, 24, None), (3, 3, 40, None), (4, 1, 32, 37)])
def test_decode_attention_reads_each_rows_prefix(dtype, rows, heads, kv_heads, head_dim, window, generator):
    slots_count, max_len = rows + 1, 300
    q = randn(rows, heads, head_dim, dtype=dtype, generator=generator)
    shape = (slots_count, kv_heads, max_len, head_dim)
    keys, values = randn(*shape, dtype=dtype, generator=generator), randn(*shape, dtype=dtype, generator=generator)
    positions = torch.randint(0, max_len, (rows,), generator=generator)
    positions[0] = 0  # a first token attends to itself alone
    positions, slots = positions.to(DEVICE), torch.randperm(slots_count, generator=generator)[:rows].to(DEVICE)
    expected = decode_attention_reference(q, keys, values, positions, slots, window=window)
    for splits in (1, 4):
        out = decode_attention(
            q,
            keys,
            values,
            positions,
            slots,
            window=window,
            splits=splits,
            out=poisoned((rows, heads * head_dim), dtype),
        )
        assert relative_error(out, expected) < tolerance(dtype)
    # Garbage beyond a row's position must not leak in.
    for m in range(rows):
        keys[slots[m], :, int(positions[m]) + 1 :] = float("nan")
        values[slots[m], :, int(positions[m]) + 1 :] = float("nan")
    assert relative_error(decode_attention(q, keys, values, positions, slots, window=window), expected) < tolerance(
        dtype
    )
