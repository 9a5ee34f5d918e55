"""What lm-eval scores with: token ids (batch, length) -> logits, with the tokenizer and the
number of positions of the model behind it.

A checkpoint runs on our runtime, on the path the engine would choose (sliceserve/engine/
loading.py: the fast path on CUDA, the reference model elsewhere). A Hugging Face folder, a
.gguf file or the demo name run as the dense reference in Transformers, as `ppl` does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sliceserve.checkpoint import is_checkpoint
from sliceserve.fast.selection import use_fast_path, uses_sparse_tensor_cores
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.slicing.sources import open_source


@dataclass
class ScoringModel:
    logits: Callable[[torch.Tensor], torch.Tensor]  # (B, T) token ids on the CPU -> (B, T, vocab)
    tokenizer: Any
    max_positions: int
    runtime: str  # "fast", "reference" or "transformers": what computes the logits


def open_scoring_model(
    path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None, runtime: str = "auto"
) -> ScoringModel:
    """The model of a checkpoint folder, or of a source model (its dense reference)."""
    if is_checkpoint(path):
        model = load_model(path, device=device, dtype=dtype)
        used = "reference"
        if use_fast_path(runtime, device):
            from sliceserve.fast.model import FastTransformer

            model = FastTransformer(model, semi_structured=uses_sparse_tensor_cores(path, device))
            used = "fast"
        return ScoringModel(
            lambda tokens: model(tokens.to(model.input_device)), load_tokenizer(path), model.spec.max_positions, used
        )
    source = open_source(str(path))
    hf = source.hf_model().to(device).eval()
    if dtype is not None:
        hf = hf.to(dtype)
    return ScoringModel(
        lambda tokens: hf(tokens.to(device)).logits,
        source.tokenizer(),
        source.config.max_position_embeddings,
        "transformers",
    )
