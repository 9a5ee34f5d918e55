"""Hadamard matrices (quantization/hadamard.py): +-1 entries, H H^T = n I, at the widths we slice."""

from __future__ import annotations

import pytest
import torch

from sliceserve.errors import SliceserveError
from sliceserve.quantization.hadamard import construction, hadamard_matrix, random_hadamard

# Llama-2-7B/13B, Qwen2-7B, Phi-2, OPT-125m, SmolLM2-135M/360M, and 25% slices of them (the
# products H H^T of Llama-2-70B's 8192 and its slice's 6144 take too long: their constructions below)
WIDTHS = [4096, 5120, 3584, 2560, 768, 576, 960, 3072, 3840, 2688, 1920, 432, 720]


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 60, 68, 108, *WIDTHS])
def test_a_hadamard_matrix_has_orthogonal_rows_of_plus_and_minus_one(n):
    h = hadamard_matrix(n)
    assert h is not None and h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_the_three_constructions_each_serve():
    assert construction(4096) == (12, 1)  # Sylvester alone
    assert construction(432) == (2, 108)  # Paley I: 107 is a prime = 3 mod 4
    assert construction(576) == (4, 36)  # Paley II: 17 is a prime = 1 mod 4
    assert construction(8192) == (13, 1) and construction(6144) == (9, 12)


def test_the_randomized_rotation_is_orthogonal_and_seeded():
    q = random_hadamard(576, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_hadamard(576, torch.Generator().manual_seed(0)))
    assert not torch.equal(q, random_hadamard(576, torch.Generator().manual_seed(1)))
    assert torch.equal(q.abs(), torch.full_like(q, 576**-0.5))  # every input spread evenly


def test_a_width_with_no_construction_is_refused_with_the_nearest_that_have_one():
    assert construction(184) is None and hadamard_matrix(184) is None
    with pytest.raises(SliceserveError, match=r"no Hadamard matrix of order 184 .*--rotate .*\(176 or 180\)"):
        random_hadamard(184, torch.Generator().manual_seed(0))
