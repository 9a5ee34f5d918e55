"""Hadamard matrices of the stream's widths, and QuaRot's randomized rotation made from them.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal
and spreads every input evenly over every output: the property QuaRot (arXiv 2404.00456) wants
before quantizing. Orders come from three constructions and their Kronecker products:
Sylvester's (powers of two), Paley's first (q + 1 for a prime q = 3 mod 4) and Paley's second
(2 (q + 1) for a prime q = 1 mod 4). That covers the widths of every family we slice (4096,
5120, 8192, 576, and their 25% slices 3072, 3840, 6144, 432); a width none of them reaches is
refused, with the nearest ones that work, rather than rotated some other way.
"""

from __future__ import annotations

import torch

from sliceserve.errors import SliceserveError


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = the quadratic character of (j - i) mod the prime q: 0, 1 or -1."""
    residues = {(x * x) % q for x in range(1, q)}
    character = torch.tensor([0.0] + [1.0 if d in residues else -1.0 for d in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return character[(index[None, :] - index[:, None]) % q]


def paley_first(q: int) -> torch.Tensor:
    """Order q + 1, for a prime q = 3 mod 4: I + [[0, 1^T], [-1, Q]]."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def paley_second(q: int) -> torch.Tensor:
    """Order 2 (q + 1), for a prime q = 1 mod 4: C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]],
    with C = [[0, 1^T], [1, Q]] (symmetric)."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(n, dtype=torch.float64), minus)


def paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Paley's constructions (or order 1), or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m % 4 == 0 and is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley_first(m - 1)
    if m % 4 == 0 and is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley_second(m // 2 - 1)
    return None


def has_paley(m: int) -> bool:
    """Whether `paley(m)` builds a matrix (without building it)."""
    return m == 1 or (m % 4 == 0 and any(is_prime(q) and q % 4 == r for q, r in ((m - 1, 3), (m // 2 - 1, 1))))


def construction(n: int) -> tuple[int, int] | None:
    """(k, m) with n = 2^k m and a Paley matrix of order m (m as small as can be), or None."""
    k = (n & -n).bit_length() - 1 if n > 0 else 0
    return next(((d, n >> d) for d in range(k, -1, -1) if has_paley(n >> d)), None)


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (float64 +-1): Sylvester's doublings of a Paley matrix, or
    None where no construction here reaches n."""
    found = construction(n)
    if found is None:
        return None
    doublings, m = found
    matrix = paley(m)
    for _ in range(doublings):
        matrix = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), matrix)
    return matrix


def require_hadamard_widths(widths: set[int]) -> None:
    """Raise, naming the nearest widths that have one, if any of `widths` has no construction here."""
    missing = sorted(w for w in widths if construction(w) is None)
    if missing:
        width = missing[0]
        near = [w for w in range(max(4, width - 64), width + 65, 4) if construction(w) is not None]
        nearest = sorted(sorted(near, key=lambda w: abs(w - width))[:2])
        raise SliceserveError(
            f"no Hadamard matrix of order {width} (a width of this checkpoint's stream) is built here: use --rotate "
            f"(random orthogonal) instead, or slice to a width that has one ({' or '.join(map(str, nearest))})"
        )


def random_hadamard(width: int, generator: torch.Generator) -> torch.Tensor:
    """QuaRot's randomized Hadamard rotation: diag(random signs) H / sqrt(width), orthogonal."""
    require_hadamard_widths({width})
    h = hadamard_matrix(width)
    signs = torch.randint(0, 2, (width,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * h / width**0.5
