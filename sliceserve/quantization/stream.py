"""The calibration tokens' residual stream through a checkpoint's own runtime model, for GPTQ.

Layer by layer: one pass of the stream through the block, with every linear's inputs gathered
into H = X^T X (float64, padding excluded); the block's linears are quantized from those; then
the stream moves on through the block as quantized, so each layer is quantized from the
inputs the quantized layers before it give (GPTQ's sequential order, by layer). Works on any
checkpoint the runtime loads: dense exports, sliced ones (the shortcuts are in the block), 2:4.
"""

from __future__ import annotations

import torch
from torch import nn

from sliceserve.model.decoder import Transformer
from sliceserve.slicing.pca import Covariance
from sliceserve.slicing.slicer import Batches


def block_linears(block: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The block's linears by their checkpoint names ("attn.q", ...), those it has."""
    found = {}
    for name in names:
        if "." not in name:  # a shortcut matrix: no module of its own
            continue
        part, linear = name.split(".")
        module = getattr(getattr(block, part), linear, None)
        if isinstance(module, nn.Linear):
            found[name] = module
    return found


class QuantizationStream:
    def __init__(self, model: Transformer, batches: Batches):
        self.model = model
        self.masks = [mask for _, mask in batches]
        device = model.input_device
        self.stream = []
        with torch.no_grad():
            for ids, _ in batches:
                positions = torch.arange(ids.shape[1], device=device)
                self.stream.append(model.embed_tokens(ids.to(device), positions))

    @property
    def tokens(self) -> int:
        return int(sum(int(mask.sum()) for mask in self.masks))

    def rope(self, x: torch.Tensor):
        return self.model.rope_for(torch.arange(x.shape[1], device=x.device), x.dtype)

    @torch.no_grad()
    def grams(self, index: int, names: tuple[str, ...]) -> dict[str, Covariance]:
        """H of each of layer `index`'s linears `names`, from one pass of the stream."""
        block = self.model.layers[index]
        covariances, hooks, batch = {}, [], {}  # batch["mask"]: the padding mask of the batch passing
        for name, linear in block_linears(block, names).items():
            covariances[name] = Covariance(linear.in_features, self.model.input_device)

            def gather(module, inputs, name=name):
                covariances[name].add(inputs[0], batch["mask"])

            hooks.append(linear.register_forward_pre_hook(gather))
        try:
            for x, mask in zip(self.stream, self.masks):
                batch["mask"] = mask
                block(x, self.rope(x))
        finally:
            for hook in hooks:
                hook.remove()
        return covariances

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Move the stream through layer `index` as it now stands."""
        block = self.model.layers[index]
        self.stream = [block(x, self.rope(x)) for x in self.stream]
