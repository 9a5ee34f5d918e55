"""Activation functions inside Triton epilogues, chosen by a compile-time code."""

from __future__ import annotations

import triton
import triton.language as tl

from sliceserve.kernels.reference import reference_activation  # noqa: F401  (the kernels' reference)

ACTIVATION_CODES = {"none": 0, "silu": 1, "relu": 2, "gelu": 3, "gelu_tanh": 4}


@triton.jit
def apply_activation(x, CODE: tl.constexpr):
    """x in float32."""
    if CODE == 1:
        x = x * tl.sigmoid(x)
    elif CODE == 2:
        x = tl.maximum(x, 0.0)
    elif CODE == 3:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif CODE == 4:
        # tanh(u) = 2 sigmoid(2u) - 1: sigmoid exists on every backend, tanh not everywhere
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    return x
