"""The fused kernels with quantized weights against their PyTorch references.

Random codes of both formats (int8; 4-bit two a byte with zero points), groups of 16 (the
smallest the kernels take), 32, 64 and 128 inputs over widths that are no multiple of a group
(nor even, for the packed bytes), steps that hold several groups, one, or lie inside one,
every epilogue of fused_linear and gated_linear, a sliced layer's shortcut step with either
product quantized, and the dequantization pass the prefill path runs. Without a GPU the
kernels run in Triton's interpreter.

The kernels round each weight w = (q - z) * s once to the activations' dtype before the dot,
and so do the references (quantized_linear.multiplied_weight). Measured relative errors on
the CPU interpreter: up to 2.3e-7 in float32; up to 5.7e-5 in float16 (outputs one rounding
apart here and there); against float32-dequantized weights float16 would be 4e-4 away, the
weights' own rounding. On a GPU the matrix units sum in their own order: kernel_support's
tolerances there.
"""

from __future__ import annotations

import pytest
import torch
from kernel_support import DEVICE, DTYPES, ON_GPU, relative_error, tolerance  # sets TRITON_INTERPRET first

from sliceserve.kernels.fused_linear import MIDDLE_TILES, TileConfig, fused_linear, fused_linear_reference
from sliceserve.kernels.gated_linear import gated_linear, gated_linear_reference
from sliceserve.kernels.quantized_linear import dequantize_reference, dequantize_weight, supports_quantized
from sliceserve.model.quantized import QuantizedWeight, dequantize, pack_nibbles

GROUPS = (16, 32, 64, 128)
# Inputs a step: the decode tiles' 256 (several groups a step), 32 (inside a group but for
# groups of 16), 16 (the shortest: one group of 16, or inside one).
STEPS = {"decode": None, "32 a step": TileConfig(16, 64, 32), "16 a step": TileConfig(16, 32, 16)}


def tight(dtype: torch.dtype) -> float:
    """The references multiply the kernels' rounded weights (module docstring): on the CPU
    within 1e-6 (float32, measured up to 2.3e-7) or 1e-4 (float16, measured up to 5.7e-5)."""
    return tolerance(dtype) if ON_GPU else {torch.float32: 1e-6, torch.float16: 1e-4}[dtype]


def random_quantized(n: int, k: int, bits: int, group: int, dtype: torch.dtype, seed: int) -> QuantizedWeight:
    """Codes over their whole range, scales such that the weights are about N(0, 1/k)."""
    generator = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    spread = (127 * 0.6) if bits == 8 else 4.6  # the codes' standard deviation about their zero
    scales = (0.5 + torch.rand(n, groups, generator=generator)) / spread / k**0.5
    zeros = None
    if bits == 8:
        codes = torch.randint(-127, 128, (n, k), generator=generator).to(torch.int8)
    else:
        codes = pack_nibbles(torch.randint(0, 16, (n, k), generator=generator))
        zeros = torch.randint(0, 16, (n, groups), generator=generator).to(torch.uint8).to(DEVICE)
    return QuantizedWeight(codes.to(DEVICE), scales.to(DEVICE, dtype), zeros, bits, group, k)


def randn(*shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", GROUPS)
def test_dequantization_is_the_loaders(bits, group):
    """The prefill path's dequantization kernel and the kernels' reference give exactly the
    weights the reference model loads (model/quantized.py)."""
    w = random_quantized(37, 301, bits, group, torch.float16, seed=bits + group)
    for dtype in (torch.float32, torch.float16):
        loaded = dequantize(w.codes, w.scales, w.zeros, w.format, w.in_features, dtype)
        assert torch.equal(dequantize_weight(w, dtype), loaded)
        assert torch.equal(dequantize_reference(w, dtype), loaded)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("steps", list(STEPS))
def test_a_quantized_product_with_every_epilogue(dtype, bits, group, steps):
    """act(r * (a @ w.T) + bias) + residual and the sums of squares of the result, three rows."""
    rows, n, k = 3, 70, 301
    a = randn(rows, k, dtype=dtype, seed=1)
    w = random_quantized(n, k, bits, group, dtype, seed=2)
    options = dict(
        bias=randn(n, dtype=dtype, seed=3, scale=0.1),
        residual=randn(rows, n, dtype=dtype, seed=4),
        norm=(a.float().pow(2).sum(-1, keepdim=True), 320, 1e-5),
        activation="gelu_tanh",
        sumsq=True,
    )
    out, partials = fused_linear(a, w, tiles=STEPS[steps], **options)
    expected, expected_sumsq = fused_linear_reference(a, w, **options)
    assert relative_error(out, expected) < tight(dtype)
    assert relative_error(partials.sum(-1, keepdim=True), expected_sumsq) < 2 * tight(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("quantized", [("shortcut",), ("projection",), ("shortcut", "projection")])
def test_the_shortcut_step_with_either_product_quantized(bits, quantized):
    """A sliced layer's residual update x @ S.T + attn @ Wo.T + b in one kernel (widths of the
    tiny models' 25% slices), with the shortcut, the projection or both quantized."""
    dtype, rows, width, heads_width = DTYPES[0], 4, 56, 80
    x, attn = randn(rows, width, dtype=dtype, seed=5), randn(rows, heads_width, dtype=dtype, seed=6)
    shortcut = randn(width, width, dtype=dtype, seed=7, scale=width**-0.5)
    projection = randn(width, heads_width, dtype=dtype, seed=8, scale=heads_width**-0.5)
    if "shortcut" in quantized:
        shortcut = random_quantized(width, width, bits, 32, dtype, seed=9)
    if "projection" in quantized:
        projection = random_quantized(width, heads_width, bits, 64, dtype, seed=10)
    bias = randn(width, dtype=dtype, seed=11, scale=0.1)
    out, partials = fused_linear(x, shortcut, a2=attn, w2=projection, bias=bias, sumsq=True)
    expected, expected_sumsq = fused_linear_reference(x, shortcut, a2=attn, w2=projection, bias=bias, sumsq=True)
    assert relative_error(out, expected) < tight(dtype)
    assert relative_error(partials.sum(-1, keepdim=True), expected_sumsq) < 2 * tight(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("group, steps", [(32, "decode"), (16, "32 a step"), (64, "16 a step")])
def test_the_gated_product_with_quantized_gate_and_up(dtype, bits, activation, group, steps):
    rows, n, k = 3, 70, 81
    a = randn(rows, k, dtype=dtype, seed=12)
    gate, up = (random_quantized(n, k, bits, group, dtype, seed=s) for s in (13, 14))
    options = dict(
        activation=activation,
        gate_bias=randn(n, dtype=dtype, seed=15, scale=0.1),
        up_bias=randn(n, dtype=dtype, seed=16, scale=0.1),
        norm=(a.float().pow(2).sum(-1, keepdim=True), 96, 1e-5),
    )
    out = gated_linear(a, gate, up, tiles=STEPS[steps], **options)
    assert relative_error(out, gated_linear_reference(a, gate, up, **options)) < tight(dtype)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_rows_numbers_do_not_depend_on_the_batch(bits):
    """Up to the decode tiles' 16 rows, a row's output is the same alone or among 15 others."""
    dtype, k = DTYPES[0], 150
    a = randn(16, k, dtype=dtype, seed=17)
    w = random_quantized(40, k, bits, 64, dtype, seed=18)
    alone, _ = fused_linear(a[:1], w)
    together, _ = fused_linear(a, w)
    assert torch.equal(alone[0], together[0])


@pytest.mark.parametrize("bits", [8, 4])
def test_more_rows_than_the_decode_tiles(bits):
    """Above 16 rows (the fast path's 'triton' products at prefill) the same kernels are right."""
    dtype, rows, n, k = DTYPES[0], 40, 40, 96
    a = randn(rows, k, dtype=dtype, seed=19)
    w = random_quantized(n, k, bits, 32, dtype, seed=20)
    residual = randn(rows, n, dtype=dtype, seed=21)
    out, _ = fused_linear(a, w, residual=residual, tiles=MIDDLE_TILES)
    expected, _ = fused_linear_reference(a, w, residual=residual)
    assert relative_error(out, expected) < tight(dtype)


@pytest.mark.parametrize("bits, group", [(8, 48), (8, 8), (4, 8), (4, 96)])
def test_groups_the_kernels_do_not_take_are_refused(bits, group):
    """Powers of two from 16 only: the fast path dequantizes the others at load
    (fast/quantized_weights.py) rather than fail."""
    w = random_quantized(8, 64, bits, group, torch.float32, seed=22)
    assert not supports_quantized(w)
    with pytest.raises(ValueError, match="powers of two"):
        fused_linear(randn(1, 64, dtype=torch.float32, seed=23), w)
