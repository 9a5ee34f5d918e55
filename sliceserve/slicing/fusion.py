"""Norm fusion: read a family's tensors and rewrite them so that every norm is weightless.

RMSNorm families: fold each norm's weight g into the linears that read it
(W <- W diag(g) in F.linear layout). LayerNorm families: first centre everything that
writes the residual stream (embedding and position rows, attention and MLP output
linears), so that the stream has zero mean and LN(x) = g * rmsnorm(x) + b; then fold g
into the readers' weights and b into their biases (bias <- bias + W b).

The results are canonical tensors (names of ``sliceserve.model.decoder``) in the original
residual coordinates, computed in float64 when asked so that rounding stays negligible.
"""

from __future__ import annotations

import torch

from sliceserve.model.spec import ATTENTION_READERS, ATTENTION_WRITER, MLP_READERS, MLP_WRITER
from sliceserve.slicing.families import OPT_POSITION_OFFSET, Family
from sliceserve.slicing.sources import ModelSource

Tensors = dict[str, torch.Tensor]


def read(source: ModelSource, stem: str, device: torch.device, dtype: torch.dtype) -> tuple:
    weight = source.tensor(stem + ".weight")
    bias = source.tensor(stem + ".bias")
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return move(weight), move(bias)


def fold_norm(tensors: Tensors, reader: str, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None) -> None:
    """Make the linear `reader` read a weightless norm instead of one with (g, b)."""
    weight = tensors[f"{reader}.weight"]
    if norm_bias is not None:
        bias = weight @ norm_bias
        old = tensors.get(f"{reader}.bias")
        tensors[f"{reader}.bias"] = bias if old is None else old + bias
    if norm_weight is not None:
        tensors[f"{reader}.weight"] = weight * norm_weight[None, :]


def centre_writer(tensors: Tensors, writer: str) -> None:
    """Make a linear's output zero-mean across the residual width (its rows are outputs)."""
    weight = tensors[f"{writer}.weight"]
    tensors[f"{writer}.weight"] = weight - weight.mean(dim=0, keepdim=True)
    if f"{writer}.bias" in tensors:
        bias = tensors[f"{writer}.bias"]
        tensors[f"{writer}.bias"] = bias - bias.mean()


def fused_embeddings(source: ModelSource, family: Family, device, dtype) -> Tensors:
    """embed.weight (and positions.weight) in original coordinates, centred for LayerNorm families."""
    tensors = {"embed.weight": read(source, family.embed, device, dtype)[0]}
    if family.positions is not None:
        tensors["positions.weight"] = read(source, family.positions, device, dtype)[0][OPT_POSITION_OFFSET:]
    if family.layer_norm:
        for name, rows in tensors.items():
            tensors[name] = rows - rows.mean(dim=1, keepdim=True)
    return tensors


def fused_layer(source: ModelSource, family: Family, index: int, device, dtype) -> Tensors:
    """One block's linears with its norms folded in (canonical names without the layer prefix)."""
    names = family.layer_names(index)
    tensors: Tensors = {}
    for canonical, stem in names.items():
        if canonical.endswith("norm"):
            continue
        weight, bias = read(source, stem, device, dtype)
        tensors[f"{canonical}.weight"] = weight
        if bias is not None:
            tensors[f"{canonical}.bias"] = bias
    attn_norm = read(source, names["attn_norm"], device, dtype)
    mlp_norm = attn_norm if family.parallel_block else read(source, names["mlp_norm"], device, dtype)
    for reader in ATTENTION_READERS:
        fold_norm(tensors, reader, *attn_norm)
    for reader in MLP_READERS:
        if f"{reader}.weight" in tensors:
            fold_norm(tensors, reader, *mlp_norm)
    if family.layer_norm:
        centre_writer(tensors, ATTENTION_WRITER)
        centre_writer(tensors, MLP_WRITER)
    return tensors


def fused_head(source: ModelSource, family: Family, device, dtype) -> Tensors:
    """head.weight/.bias reading a weightless final norm (untied from the embedding)."""
    weight, bias = read(source, family.head, device, dtype)
    if weight is None:  # tied embeddings: the head gets its own copy, rotated differently
        weight = read(source, family.embed, device, dtype)[0].clone()
    tensors = {"head.weight": weight}
    if bias is not None:
        tensors["head.bias"] = bias
    fold_norm(tensors, "head", *read(source, family.final_norm, device, dtype))
    return tensors
