"""Round-to-nearest onto the integer grids of model/quantized.py, a group of inputs at a time.

8 bits: symmetric, w = q * s with q in [-127, 127] and s = max|w| / 127 per group.
4 bits: asymmetric, w = (q - z) * s with q, z in [0, 15], the grid spanning the group's
[min(w, 0), max(w, 0)] (zero exactly representable, as GPTQ's quantizer does).
"""

from __future__ import annotations

import torch

from sliceserve.model.quant_format import QuantFormat


def group_grid(weights: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) per row of `weights` (out, group columns): shapes (out, 1)."""
    if bits == 8:
        scale = weights.abs().amax(dim=1, keepdim=True) / 127
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    low = weights.amin(dim=1, keepdim=True).clamp(max=0)
    high = weights.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (high - low) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-low / scale).clamp(0, 15)


def to_codes(weights: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    if bits == 8:
        return torch.round(weights / scale).clamp(-127, 127)
    return torch.clamp(torch.round(weights / scale) + zero, 0, 15)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (codes if zero is None else codes - zero) * scale


def round_to_nearest(weight: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (out, in), scales (out, groups), zeros (out, groups) or None) of `weight`."""
    codes, scales, zeros = [], [], []
    for start in range(0, weight.shape[1], fmt.group_size):
        group = weight[:, start : start + fmt.group_size]
        scale, zero = group_grid(group, fmt.bits)
        codes.append(to_codes(group, scale, zero, fmt.bits))
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(codes, 1), torch.cat(scales, 1), None if fmt.bits == 8 else torch.cat(zeros, 1)
