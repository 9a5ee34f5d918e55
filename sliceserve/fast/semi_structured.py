"""2:4-pruned checkpoints on GPUs with sparse tensor cores (the paper's SparseGPT baseline).

A 2:4 weight keeps at most 2 non-zeros in every group of 4 consecutive inputs. Ampere and
Hopper multiply such a matrix at up to twice the dense rate from a compressed copy (half
the values plus 2-bit indices). PyTorch exposes this as semi-structured sparse tensors; on
Hopper only the cuSPARSELt backend has kernels (the CUTLASS ones are sm80-only). Every
call costs host time, so the fast path runs them inside its CUDA graphs.

The layer below is the fast path's layer with the projections done by those tensors: the
norm is applied before each product (a sparse product cannot take a row scale in its
epilogue), and biases and residuals are plain adds. Elsewhere (CPU, older GPUs) a 2:4
checkpoint runs as a dense one whose zeros are multiplied like any other weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sliceserve.errors import SliceserveError
from sliceserve.kernels.activations import reference_activation
from sliceserve.kernels.rms_norm import rms_norm


def check_two_four(name: str, weight: torch.Tensor) -> None:
    if weight.shape[1] % 4:
        raise SliceserveError(f"{name}: input width {weight.shape[1]} is not a multiple of 4, so it cannot be 2:4")
    nonzero = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    if int(nonzero.max()) > 2:
        raise SliceserveError(f"{name} is not 2:4 sparse (a group of 4 inputs has {int(nonzero.max())} non-zeros)")


def to_semi_structured(name: str, weight: torch.Tensor) -> torch.Tensor:
    """The compressed sparse form of a 2:4 weight (cuSPARSELt backend)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    check_two_four(name, weight)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False  # CUTLASS kernels are sm80-only; Hopper needs cuSPARSELt
    return to_sparse_semi_structured(weight.contiguous())


@dataclass
class SparseLayer:
    """A sequential dense-width layer's projections as semi-structured tensors."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor | None  # gated MLPs: gate and up stacked, one product
    up: torch.Tensor | None  # ungated MLPs
    down: torch.Tensor
    biases: dict[str, torch.Tensor | None]

    @classmethod
    def from_fast_layer(cls, index: int, layer) -> SparseLayer:
        if layer.attn_shortcut is not None or layer.shortcut is not None:
            raise SliceserveError("a 2:4 checkpoint with shortcut matrices (sliced and pruned) is not supported")
        p = f"layers.{index}"
        gate_up = None
        if layer.gate_weight is not None:
            gate_up = to_semi_structured(f"{p}.mlp.gate/up", torch.cat([layer.gate_weight, layer.up_weight]))
        return cls(
            qkv=to_semi_structured(f"{p}.attn.qkv", layer.qkv_weight),
            o=to_semi_structured(f"{p}.attn.o", layer.o_weight),
            gate_up=gate_up,
            up=None if gate_up is not None else to_semi_structured(f"{p}.mlp.up", layer.up_weight),
            down=to_semi_structured(f"{p}.mlp.down", layer.down_weight),
            biases={
                "qkv": layer.qkv_bias,
                "o": layer.o_bias,
                "gate": layer.gate_bias,
                "up": layer.up_bias,
                "down": layer.down_bias,
            },
        )


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # cuSPARSELt computes (W @ x.T).T and hands back the transposed view; our kernels
    # read rows as contiguous, so the result is made row-major here.
    out = F.linear(x, weight).contiguous()
    return out if bias is None else out + bias


def sparse_layer_forward(
    model, i: int, x: torch.Tensor, positions, slots, cache, splits: int | None, tiles=None
) -> torch.Tensor:
    """One sequential block with semi-structured projections; returns the new residual stream."""
    layer = model.sparse_layers[i]
    h = rms_norm(x, model.width, model.eps)
    qkv = sparse_linear(h, layer.qkv, layer.biases["qkv"])
    q = model.rotate_and_store(qkv, positions, slots, cache, i)
    attn = model.attend(q, positions, slots, cache, i, splits, tiles)
    x = x + sparse_linear(attn, layer.o, layer.biases["o"])
    h = rms_norm(x, model.width, model.eps)
    if layer.gate_up is not None:
        gate, up = sparse_linear(h, layer.gate_up, None).chunk(2, dim=-1)
        if layer.biases["gate"] is not None:
            gate, up = gate + layer.biases["gate"], up + layer.biases["up"]
        act = reference_activation(gate, model.activation) * up
    else:
        act = reference_activation(sparse_linear(h, layer.up, layer.biases["up"]), model.activation)
    return x + sparse_linear(act, layer.down, layer.biases["down"])
