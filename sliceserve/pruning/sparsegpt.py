"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer to an N:M pattern and update
its remaining weights so that its output on the calibration inputs changes least.

For one output row w, inputs X (tokens x in) and H = X^T X: removing weight j and moving the
weights not yet visited to compensate (optimal brain surgeon, restricted to those columns)
costs w_j^2 / [H_F^-1]_jj, where F is the set of columns from j on. Sweeping the columns left
to right, every [H_F^-1] needed is read off one upper Cholesky factor U of H^-1 (U^T U = H^-1):
U_jj^2 = [H_F^-1]_jj and U[j, j:] / U_jj is the compensating direction. So per column j,

    err_j = (w_j - pruned w_j) / U_jj,        w[j:] -= err_j * U[j, j:].

The mask of a group of M columns is chosen when the sweep reaches its first column, from
the weights as updated so far: prune the M - N entries with the smallest w^2 / U_jj^2.
Updates are lazy (the paper's lazy batch updates), at three levels: a group's column steps
touch only its M columns, then a group receives the updates of its block's earlier groups in
one product just before its mask is chosen, and the columns right of a block of 128 receive
the whole block's updates in one product.
Rows are independent given H, so linears reading one input share one H and are pruned as
one stacked matrix.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from sliceserve.errors import SliceserveError
from sliceserve.pruning.pattern import NMPattern

BLOCK_COLUMNS = 128
DAMPING = 0.01  # of the mean diagonal of H, as in the paper


def inverse_hessian_factor(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping * mean(diag H) * I)^-1, float64.

    One Cholesky and one triangular inverse: with J the reversal of the columns,
    J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular.
    """
    hessian = gram.to(torch.float64).clone()
    diagonal = hessian.diagonal()
    diagonal[diagonal == 0] = 1.0  # an input the calibration never excites: keep H invertible
    diagonal += damping * diagonal.mean()
    lower, info = torch.linalg.cholesky_ex(hessian.flip(0, 1))
    if int(info) != 0:
        raise SliceserveError("SparseGPT: the calibration Hessian is not positive definite (try more calibration text)")
    eye = torch.eye(hessian.shape[0], dtype=torch.float64, device=hessian.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


def group_factors(factor: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal (G, M) and the strictly upper part (G, M, M) of U's M x M diagonal blocks."""
    count = factor.shape[0] // group
    blocks = torch.diagonal(factor.reshape(count, group, count, group), dim1=0, dim2=2).permute(2, 0, 1)
    return blocks.diagonal(dim1=1, dim2=2), blocks.triu(1)


def prune_group(weights: torch.Tensor, scale: torch.Tensor, strict: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Prune one group of M columns in place (`weights` (rows, M), a view into the weight);
    returns the errors err (rows, M) whose products with U's rows update the later columns.

    `scale` is the group's U_jj, `strict` the strictly upper part of its block of U. The group's
    column steps touch only its own columns: column j, as updated by the group's earlier
    columns, is w_j - sum_{i<j} err_i U_ij; its error is that over U_jj where pruned, else 0.
    """
    saliency = (weights / scale) ** 2
    smallest = saliency.topk(pattern.group - pattern.kept, dim=1, largest=False).indices
    pruned = torch.zeros_like(weights).scatter_(1, smallest, 1.0)
    errors = torch.zeros_like(weights)
    for j in range(pattern.group):
        errors[:, j] = (weights[:, j] - errors[:, :j] @ strict[:j, j]) * pruned[:, j] / scale[j]
    weights -= errors @ strict
    weights.masked_fill_(pruned.bool(), 0.0)  # exact zeros, not rounding residue
    return errors


def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    pattern: NMPattern,
    *,
    block_columns: int = BLOCK_COLUMNS,
    damping: float = DAMPING,
) -> torch.Tensor:
    """`weight` (out, in) pruned to `pattern` with error compensation, given H = X^T X (in, in).

    Computed in float64 on H's device; returned in the weight's dtype.
    """
    w = weight.to(device=gram.device, dtype=torch.float64).clone()
    u = inverse_hessian_factor(gram, damping)
    scales, stricts = group_factors(u, pattern.group)
    columns, m = w.shape[1], pattern.group
    block_columns = max(1, block_columns // m) * m  # blocks hold whole groups
    with one_thread_on_cpu(w.device):
        for start in range(0, columns, block_columns):
            end = min(start + block_columns, columns)
            block, u_block = w[:, start:end], u[start:end, start:end]  # views: updates land in w
            errors = torch.empty_like(block)
            for g in range(0, end - start, m):
                group = block[:, g : g + m]
                group -= errors[:, :g] @ u_block[:g, g : g + m]  # the updates of this block's earlier groups
                index = (start + g) // m
                errors[:, g : g + m] = prune_group(group, scales[index], stricts[index], pattern)
            w[:, end:] -= errors @ u[start:end, end:]
    return w.to(weight.dtype)


@contextmanager
def one_thread_on_cpu(device: torch.device):
    """The sweep is thousands of small operations: on a CPU whose cores are shared, waking the
    other threads for each costs far more than they give. Measured on this project's 2-core
    machine while other jobs ran: one SmolLM2-135M layer (all its sweeps and passes) took 2.4 s
    with one thread for the sweeps, 18-28 s with two; idle, the sweep of a 3072 x 576 weight
    takes 0.22 s with one thread, 0.20 s with two."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """||X W^T - X W_pruned^T||_F / ||X W^T||_F, from H = X^T X (float64)."""
    gram = gram.to(torch.float64)
    weight = weight.to(device=gram.device, dtype=torch.float64)
    delta = weight - pruned.to(device=gram.device, dtype=torch.float64)
    lost = float(((delta @ gram) * delta).sum())
    total = float(((weight @ gram) * weight).sum())
    return math.sqrt(max(lost, 0.0) / total) if total > 0 else 0.0
