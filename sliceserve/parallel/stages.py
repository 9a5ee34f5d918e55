"""One pipeline stage behind one interface, whichever path computes it.

A stage is a `Transformer` built over a contiguous range of layers (the first stage also
holds the embedding, the last the head). The pipelines (one process: `pipeline.py`;
several: `front.py` and `stage_worker.py`) pass a stage's *activations* to the next: a list
of tensors shaped (rows, length, ...):
  - `ReferenceStage` (plain PyTorch, any device): [x]
  - `FastStage` (Triton kernels, fast/model.py): [x, partial sums of squares of x]
    (float32): the next stage's first product applies the norm of x from those sums in its
    epilogue, as it does inside one device, so a stage boundary changes no number.
"""

from __future__ import annotations

import contextlib

import torch

from sliceserve.fast.model import FastTransformer, batch_tiles
from sliceserve.model.decoder import CacheView, Transformer
from sliceserve.model.kv_cache import KVCache

Activations = list[torch.Tensor]


def on_device(device: torch.device):
    """Make `device` current: Triton launches its kernels on the current CUDA device and
    stream, whatever device the tensors are on."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def moved(activations: Activations, device: torch.device) -> Activations:
    return [t.to(device) for t in activations]


def cache_rows(slots: torch.Tensor, positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(slot, first position, last position) per row, as CacheView takes them."""
    return [(s, p[0], p[-1]) for s, p in zip(slots.tolist(), positions.tolist())]


class ReferenceStage:
    """A stage run by the reference modules (model/decoder.py)."""

    fast = False

    def __init__(self, model: Transformer, device: torch.device):
        self.model, self.device, self.spec = model, torch.device(device), model.spec
        self.dtype = next(model.parameters()).dtype

    def new_cache(self, *, slots: int, max_len: int, blocks: int | None = None) -> KVCache:
        return KVCache(
            self.spec,
            slots=slots,
            max_len=max_len,
            device=self.device,
            dtype=self.dtype,
            layers=len(self.model.layers),
            blocks=blocks,
        )

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> Activations:
        return [self.model.embed_tokens(tokens, positions)]

    def advance(
        self,
        activations: Activations,
        positions: torch.Tensor,
        slots: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Activations:
        """The activations after this stage's layers; without a cache, positions are 0..length-1."""
        x, model = activations[0], self.model
        rope = model.rope_for(positions, x.dtype)
        rows = None if cache is None else cache_rows(slots, positions)
        for i, block in enumerate(model.layers):
            x = block(x, rope, None if cache is None else CacheView(cache, i, rows))
        return [x]

    def logits(self, activations: Activations, last_only: bool = False) -> torch.Tensor:
        x = activations[0]
        return self.model.final_logits(x[:, -1:] if last_only else x)


class FastStage:
    """A stage run by the fast path's per-layer code (Triton kernels; interpreted on a CPU)."""

    fast = True

    def __init__(
        self, model: Transformer, device: torch.device, *, semi_structured: bool = False, products: str = "auto"
    ):
        # Keeps no reference to `model`: the fast layers hold the tensors they use (q, k and v
        # concatenated), so the caller dropping `model` frees the separate q, k, v.
        self.model = FastTransformer(model, semi_structured=semi_structured, products=products)
        self.device, self.spec, self.dtype = torch.device(device), model.spec, self.model.dtype

    def new_cache(self, *, slots: int, max_len: int, blocks: int | None = None) -> KVCache:
        return self.model.new_cache(slots=slots, max_len=max_len, blocks=blocks)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> Activations:
        """positions (B, T), or (T,) for every row."""
        positions = positions.expand(tokens.shape)
        with on_device(self.device):
            x, px = self.model.embed_rows(tokens.reshape(-1), positions.reshape(-1))
        return shaped([x, px], tokens.shape)

    def advance(
        self,
        activations: Activations,
        positions: torch.Tensor,
        slots: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Activations:
        """As FastTransformer's step over flat rows; without a cache, positions are
        0..length-1 and a scratch cache takes the keys, as FastTransformer.forward does."""
        x, px = activations
        batch, length = x.shape[:2]
        if cache is None:
            cache = self.new_cache(slots=batch, max_len=length)
            slots = torch.arange(batch, device=self.device)
            positions = positions.expand(batch, length)
        flat_slots = slots.repeat_interleave(length)
        splits = self.model.decode_splits(batch, self.device)
        with on_device(self.device):
            x, px = self.model.run_layers(
                x.reshape(batch * length, -1),
                px.reshape(batch * length, -1),
                positions.reshape(-1),
                flat_slots,
                cache,
                splits=splits,
                tiles=None if length == 1 else batch_tiles(positions.expand(batch, length), slots),
            )
        return shaped([x, px], (batch, length))

    def logits(self, activations: Activations, last_only: bool = False) -> torch.Tensor:
        x, px = activations
        batch, length = x.shape[:2]
        last_rows = None
        if last_only:  # the same row selection as FastTransformer.forward_cached
            last_rows = torch.arange(length - 1, batch * length, length, device=x.device)
        with on_device(self.device):
            logits = self.model.head_logits(x.reshape(batch * length, -1), px.reshape(batch * length, -1), last_rows)
        return logits.view(batch, 1 if last_only else length, -1)


def shaped(flat: Activations, shape: tuple[int, int]) -> Activations:
    """Flat (rows * length, ...) tensors as (rows, length, ...)."""
    return [t.view(*shape, t.shape[-1]) for t in flat]


def make_stage(
    model: Transformer, device: torch.device | str, *, fast: bool, semi_structured: bool = False
) -> ReferenceStage | FastStage:
    if fast:
        return FastStage(model, torch.device(device), semi_structured=semi_structured)
    return ReferenceStage(model, torch.device(device))
