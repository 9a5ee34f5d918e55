"""Magnitude N:M pruning: keep the N largest |w| of each group of M inputs. No data needed.

Applied to the canonical (norm-fused) weights, so the magnitudes already include each
norm's per-input scale: that is the scale the weights act with.
"""

from __future__ import annotations

import torch

from sliceserve.pruning.pattern import NMPattern


def magnitude_prune(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """A copy of `weight` (out, in) with the M - N smallest |w| of each group set to zero."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // pattern.group, pattern.group)
    smallest = groups.abs().topk(pattern.group - pattern.kept, dim=-1, largest=False).indices
    return groups.scatter(-1, smallest, 0.0).reshape(rows, columns)


def relative_weight_change(weight: torch.Tensor, pruned: torch.Tensor) -> float:
    """||W - W_pruned||_F / ||W||_F: the error measure when there is no calibration data."""
    weight = weight.double()
    return float((weight - pruned.double()).norm() / weight.norm().clamp(min=1e-300))
