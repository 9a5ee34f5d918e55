"""An engine over a checkpoint folder: the model on its path, the tokenizer, the graphs captured."""

from __future__ import annotations

from pathlib import Path

import torch

from sliceserve.engine.engine import Engine
from sliceserve.engine.kv_blocks import blocks_to_hold
from sliceserve.fast.selection import use_fast_path, uses_sparse_tensor_cores
from sliceserve.model.loader import load_model, load_tokenizer


def load_engine(
    path: str | Path,
    *,
    device: str = "cpu",
    max_batch: int = 8,
    max_model_len: int | None = None,
    max_queue: int = 64,
    prefill_chunk: int = 256,
    dtype: torch.dtype | None = None,
    runtime: str = "auto",
    kv_cache_memory: int | None = None,
    token_budget: int | None = None,
    decoding_budget: int | None = None,
) -> Engine:
    """An engine over a checkpoint folder (dense or sliced), not yet started, over a paged KV
    cache (engine/kv_blocks.py: `kv_cache_memory` bytes of it, or what max_batch requests of
    max_model_len tokens need, as far as the GPU has room).

    runtime: "fast" (Triton kernels and CUDA graphs; CUDA only), "reference" (plain PyTorch),
    or "auto" (fast on CUDA, reference elsewhere). token_budget: tokens a step may carry, and
    decoding_budget: while requests decode (the Engine's defaults where None).
    """
    model = load_model(path, device=device, dtype=dtype)
    if use_fast_path(runtime, device):
        from sliceserve.fast.model import FastTransformer

        model = FastTransformer(model, semi_structured=uses_sparse_tensor_cores(path, device))
    if model.input_device.type == "cuda":
        torch.cuda.empty_cache()  # what the loading left cached counts as free
    max_len = min(max_model_len or model.spec.max_positions, model.spec.max_positions)
    blocks = blocks_to_hold(model, max_batch=max_batch, max_model_len=max_len, memory=kv_cache_memory)
    return Engine(
        model,
        load_tokenizer(path),
        max_batch=max_batch,
        max_model_len=max_model_len,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        kv_blocks=blocks,
        token_budget=token_budget,
        decoding_budget=decoding_budget,
    )
