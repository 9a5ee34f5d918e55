"""The sliced model's residual step: x_new = x @ S + y, with the norm of x_new.

S rotates the residual stream from one layer point's basis into the next one's (and drops
the sliced coordinates). The next block reads norm(x_new); a GEMM epilogue cannot finish
a row norm because a row spans many column tiles, so each tile leaves its partial sum of
squares and the consumer (the next projection's epilogue, or `row_scale`) adds them up.

Two variants share the kernel: decode sizes (few rows: narrow column tiles so the read of
S spreads over every SM) and prefill sizes (square tiles on the matrix units); `tiles_for`
picks by row count. In the fast path the step usually also absorbs y = attn @ Wo itself
(`fused_linear(x, S, a2=attn, w2=Wo)`); this module is the standalone form.
"""

from __future__ import annotations

import torch

from sliceserve.kernels.fused_linear import (
    TileConfig,
    fused_linear,
    fused_linear_reference,
    row_scale_reference,
)


def shortcut_step(
    x: torch.Tensor,
    shortcut: torch.Tensor,
    y: torch.Tensor,
    *,
    tiles: TileConfig | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new, partial sums of squares of x_new). x (M, d_in); shortcut (d_out, d_in) in
    F.linear layout; y (M, d_out)."""
    return fused_linear(x, shortcut, residual=y, sumsq=True, tiles=tiles, out=out)


def row_scale(partials: torch.Tensor, original_width: int, eps: float) -> torch.Tensor:
    """1 / rms per row (M, 1) from the partial sums of squares, float32."""
    return row_scale_reference(partials, original_width, eps)


def shortcut_step_reference(
    x: torch.Tensor, shortcut: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_linear_reference(x, shortcut, residual=y, sumsq=True)
