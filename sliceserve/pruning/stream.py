"""SparseGPT over a whole decoder: the calibration tokens' residual stream, pushed through
each layer right after that layer is pruned.

Inside a block the linears are pruned in the order the data reaches them, each from inputs
computed through the linears already pruned (q, k, v; then o; then the MLP's inputs; then
its output), and the next layer's inputs come from this pruned layer, as SparseGPT does
sequentially. Linears that read one input share one H = X^T X (float64, padding excluded).
Only one layer's weights and the stream are held; intermediate activations (attention heads,
MLP hidden) are recomputed rather than stored, since they are wider than the stream.

We prune the canonical weights that the export writes: the norm weight g folded in
(W diag(g)), reading the weightless norm's output x. SparseGPT's saliency is invariant to
such a per-input scale: inputs x diag(1/g) give H' = diag(1/g) H diag(1/g), hence
[H'^-1]_jj = g_j^2 [H^-1]_jj while w'_j^2 = g_j^2 w_j^2, and the compensating updates scale
alike. So fusing first prunes the same weights as pruning Hugging Face's layout (up to the 1%
dampening, added in whichever coordinates H is formed). Magnitude pruning is not invariant:
it ranks the fused weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sliceserve.model.decoder import MLP, Attention, rms_norm
from sliceserve.model.rope import inverse_frequencies, rope_tables
from sliceserve.model.spec import ATTENTION_READERS, ATTENTION_WRITER, MLP_READERS, MLP_WRITER, DecoderSpec
from sliceserve.pruning.pattern import NMPattern
from sliceserve.pruning.sparsegpt import reconstruction_error, sparsegpt_prune
from sliceserve.slicing.fusion import Tensors
from sliceserve.slicing.pca import Covariance
from sliceserve.slicing.slicer import ActivationStore, Batches, activations_fit, module_inputs

Activation = Callable[[torch.Tensor], torch.Tensor]


class SparseGPTStream:
    """The calibration stream (original coordinates) and the pruning of one layer at a time."""

    def __init__(
        self,
        spec: DecoderSpec,
        embeddings: Tensors,
        batches: Batches,
        pattern: NMPattern,
        device: torch.device,
        compute_dtype: torch.dtype,
    ):
        self.spec, self.pattern, self.device, self.compute_dtype = spec, pattern, device, compute_dtype
        self.masks = [mask.to(device) for _, mask in batches]
        tokens = sum(int(ids.numel()) for ids, _ in batches)
        self.store = ActivationStore(device, activations_fit(device, tokens, spec.original_width, compute_dtype))
        self.inv_freq = None if spec.rope is None else inverse_frequencies(spec.rope)
        for i, (ids, _) in enumerate(batches):
            x = embeddings["embed.weight"][ids.to(device)]
            if "positions.weight" in embeddings:
                x = x + embeddings["positions.weight"][: ids.shape[1]]
            self.store.put(i, x.to(compute_dtype))

    @property
    def tokens(self) -> int:
        """Calibration tokens that enter the statistics (padding excluded)."""
        return int(sum(int(mask.sum()) for mask in self.masks))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.spec.original_width, self.spec.norm_eps)

    def rope(self, x: torch.Tensor):
        if self.inv_freq is None:
            return None
        return rope_tables(self.inv_freq, torch.arange(x.shape[1], device=self.device), self.compute_dtype)

    def module(self, kind: type, tensors: Tensors, prefix: str, *, without: str | None = None) -> nn.Module:
        """A runtime Attention or MLP over the layer's current tensors; `without` drops its output
        linear, so the module returns what that linear reads."""
        module = kind(self.spec, module_inputs(tensors, self.compute_dtype), prefix)
        if without is not None:
            setattr(module, without, nn.Identity())
        return module

    def grams(self, *inputs: Activation) -> list[Covariance]:
        """H = X^T X of each function of the stream, over the non-padding tokens."""
        covariances: list[Covariance | None] = [None] * len(inputs)
        for i, mask in enumerate(self.masks):
            x = self.store.get(i)
            for k, function in enumerate(inputs):
                rows = function(x)
                if covariances[k] is None:
                    covariances[k] = Covariance(rows.shape[-1], self.device)
                covariances[k].add(rows, mask)
        return covariances

    def advance(self, step: Activation) -> None:
        """Replace the stream by step(stream), batch by batch."""
        for i in range(len(self.masks)):
            self.store.put(i, step(self.store.get(i)))

    def prune_readers(self, tensors: Tensors, names: tuple[str, ...], covariance: Covariance) -> dict[str, float]:
        """Prune the linears `names` (those present), which all read the input whose H is given."""
        names = tuple(name for name in names if f"{name}.weight" in tensors)
        weights = [tensors[f"{name}.weight"] for name in names]
        pruned = sparsegpt_prune(torch.cat(weights), covariance.gram, self.pattern)
        errors = {}
        for name, weight, new in zip(names, weights, pruned.split([w.shape[0] for w in weights])):
            errors[name] = reconstruction_error(weight, new, covariance.gram)
            tensors[f"{name}.weight"] = new
        return errors

    def prune_layer(self, tensors: Tensors) -> dict[str, float]:
        """Prune one layer's linears in place and move the stream past the pruned layer.

        Returns each linear's relative output error on the calibration tokens."""
        if self.spec.parallel_block:
            return self.prune_parallel_layer(tensors)
        return self.prune_sequential_layer(tensors)

    def prune_sequential_layer(self, tensors: Tensors) -> dict[str, float]:
        errors = self.prune_readers(tensors, ATTENTION_READERS, *self.grams(self.norm))
        heads = self.module(Attention, tensors, "attn", without="o")
        errors |= self.prune_readers(
            tensors, (ATTENTION_WRITER,), *self.grams(lambda x: heads(self.norm(x), self.rope(x)))
        )
        attention = self.module(Attention, tensors, "attn")
        self.advance(lambda x: x + attention(self.norm(x), self.rope(x)))

        errors |= self.prune_readers(tensors, MLP_READERS, *self.grams(self.norm))
        hidden = self.module(MLP, tensors, "mlp", without="down")
        errors |= self.prune_readers(tensors, (MLP_WRITER,), *self.grams(lambda x: hidden(self.norm(x))))
        mlp = self.module(MLP, tensors, "mlp")
        self.advance(lambda x: x + mlp(self.norm(x)))
        return errors

    def prune_parallel_layer(self, tensors: Tensors) -> dict[str, float]:
        """Attention and MLP read one norm of the input and both write the output."""
        errors = self.prune_readers(tensors, ATTENTION_READERS + MLP_READERS, *self.grams(self.norm))
        heads = self.module(Attention, tensors, "attn", without="o")
        hidden = self.module(MLP, tensors, "mlp", without="down")
        heads_gram, hidden_gram = self.grams(
            lambda x: heads(self.norm(x), self.rope(x)), lambda x: hidden(self.norm(x))
        )
        errors |= self.prune_readers(tensors, (ATTENTION_WRITER,), heads_gram)
        errors |= self.prune_readers(tensors, (MLP_WRITER,), hidden_gram)
        attention, mlp = self.module(Attention, tensors, "attn"), self.module(MLP, tensors, "mlp")

        def block(x: torch.Tensor) -> torch.Tensor:
            h = self.norm(x)
            return x + attention(h, self.rope(x)) + mlp(h)

        self.advance(block)
        return errors
