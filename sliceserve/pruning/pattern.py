"""N:M semi-structured sparsity: at most N non-zero weights in every group of M consecutive
inputs of an output row (2:4 is what sparse tensor cores run).

Weights are in ``F.linear`` layout (out, in), so a group is M consecutive columns of a row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sliceserve.errors import SliceserveError
from sliceserve.model.spec import ATTENTION_READERS, BLOCK_LINEARS, DecoderSpec

METHODS = ("sparsegpt", "magnitude")

# Every linear of a decoder layer is pruned; embeddings and the head stay dense, as in SparseGPT.
PRUNED_LINEARS = BLOCK_LINEARS


@dataclass(frozen=True)
class NMPattern:
    kept: int  # N: non-zeros allowed per group
    group: int  # M: consecutive inputs per group

    def __str__(self) -> str:
        return f"{self.kept}:{self.group}"


def parse_pattern(text: str) -> NMPattern:
    """'2:4' -> NMPattern(2, 4); anything but N:M with 0 < N < M is refused."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if match is None:
        raise SliceserveError(f"--pattern must be N:M (as 2:4), got {text!r}")
    kept, group = int(match[1]), int(match[2])
    if not 0 < kept < group:
        raise SliceserveError(f"--pattern {text} must have 0 < N < M (N non-zeros kept in each group of M)")
    return NMPattern(kept, group)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise SliceserveError(f"unknown pruning method {method!r} (use one of: {', '.join(METHODS)})")
    return method


def linear_input_widths(spec: DecoderSpec) -> dict[str, int]:
    """Input width of each pruned linear of a dense layer."""
    widths = {name: spec.original_width for name in (*ATTENTION_READERS, "mlp.up")}
    if spec.gated_mlp:
        widths["mlp.gate"] = spec.original_width
    widths["attn.o"] = spec.num_heads * spec.head_dim
    widths["mlp.down"] = spec.intermediate_size
    return widths


def check_pattern_fits(spec: DecoderSpec, pattern: NMPattern) -> None:
    """Refuse a pattern whose group size does not divide the input width of every linear."""
    for name, width in linear_input_widths(spec).items():
        if width % pattern.group:
            raise SliceserveError(
                f"--pattern {pattern}: the input width {width} of {name} is not a multiple of {pattern.group}"
            )


def nonzeros_per_group(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """(out, in / M) counts of non-zero weights in each group."""
    rows, columns = weight.shape
    return (weight.reshape(rows, columns // pattern.group, pattern.group) != 0).sum(-1)
