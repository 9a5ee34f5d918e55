"""GPTQ (Frantar et al., arXiv 2210.17323): quantize a linear's input columns one by one,
each column's rounding error spread over the columns not yet quantized, weighted by the
inverse of H = X^T X of the linear's inputs on calibration text.

Columns are taken in blocks (the error of a block's columns is applied to the later columns
in one product); each group's grid is set from its columns as they stand when the group
begins, after the error feedback of the groups before it. float64 throughout.
"""

from __future__ import annotations

import torch

from sliceserve.model.quant_format import QuantFormat
from sliceserve.quantization.grids import from_codes, group_grid, to_codes

DAMPING = 0.01  # of the mean diagonal of H, added to it: H of few tokens is singular


def gptq_quantize(
    weight: torch.Tensor, gram: torch.Tensor, fmt: QuantFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (out, in), scales (out, groups), zeros or None) of `weight` (out, in) for inputs
    whose H = X^T X is `gram` (in, in)."""
    w = weight.to(torch.float64).clone()
    h = gram.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs never seen: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    columns, group = w.shape[1], fmt.group_size
    block = max(128 // group, 1) * group  # whole groups a block: a group's grid sees its updated columns
    codes = torch.zeros_like(w)
    scales, zeros = [], []
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part, errors, part_inverse = (
            w[:, start:end].clone(),
            torch.zeros_like(w[:, start:end]),
            inverse[start:end, start:end],
        )
        for i in range(end - start):
            if i % group == 0:
                scale, zero = group_grid(part[:, i : i + group], fmt.bits)
                scales.append(scale)
                zeros.append(zero)
            column = part[:, i : i + 1]
            code = to_codes(column, scale, zero, fmt.bits)
            codes[:, start + i : start + i + 1] = code
            error = (column - from_codes(code, scale, zero)) / part_inverse[i, i]
            part[:, i:] -= error @ part_inverse[i : i + 1, i:]
            errors[:, i : i + 1] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes, torch.cat(scales, 1), None if fmt.bits == 8 else torch.cat(zeros, 1)
