"""Rotary position embeddings.

The angle tables are computed in float32 whatever the model dtype, as the models were
trained (and as Transformers computes them), then cast to the activation dtype.
"""

from __future__ import annotations

import math

import torch

from sliceserve.model.spec import RopeSpec


def inverse_frequencies(rope: RopeSpec) -> torch.Tensor:
    """Per-pair inverse frequencies (rotary_dim / 2,), float32, with the model's scaling."""
    dim = rope.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        # Llama 3.1: long wavelengths slow down by `factor`, short ones stay, a smooth ramp between.
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (*positions.shape, rotary_dim) for the given positions."""
    freqs = positions[..., None].to(torch.float32) * inv_freq.to(positions.device, torch.float32)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of each head. x: (B, heads, T, head_dim);
    cos, sin: (B, T, rotary_dim) or (T, rotary_dim)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
