"""Calibration text sampled from the model itself, so slicing needs no data set.

Sampling runs on our own engine over the dense model with its norms fused (the same
canonical model the slicer starts from): continuous batching makes this several times
faster on a CPU than Transformers' `generate` (measured: 8 x 32 tokens of SmolLM2-135M,
14 s against 121 s on this project's 2-core machine, both under the same load).
"""

from __future__ import annotations

import json
import os
import queue
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from sliceserve.engine.engine import Engine
from sliceserve.engine.requests import SamplingParams
from sliceserve.errors import SliceserveError
from sliceserve.model.decoder import Transformer
from sliceserve.slicing.families import decoder_spec
from sliceserve.slicing.fusion import fused_embeddings, fused_head, fused_layer
from sliceserve.slicing.sources import ModelSource


def dense_runtime_model(source: ModelSource, dtype: torch.dtype = torch.float32) -> Transformer:
    """The source model as our runtime's dense model, in memory (norms fused, no rotation)."""
    device = torch.device("cpu")
    tensors = fused_embeddings(source, source.family, device, torch.float64)
    spec = decoder_spec(source.family, source.config)
    for index in range(spec.num_layers):
        layer = fused_layer(source, source.family, index, device, torch.float64)
        tensors.update({f"layers.{index}.{name}": t for name, t in layer.items()})
    tensors.update(fused_head(source, source.family, device, torch.float64))
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    return Transformer(spec, tensors.get).eval()


def chat_prefix_ids(tokenizer) -> list[int] | None:
    """The chat template's text up to where a user's words begin, as token ids (None without a template).

    Instruct models spend their life inside their chat format; calibration text that starts
    there (and runs on through the turns the model writes itself) keeps that format's
    statistics in the PCA.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\u2063USER\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    except Exception:  # a template that wants more than one user message: fall back to BOS
        return None
    if marker not in text:
        return None
    return list(tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]) or None


def generated_token_windows(
    model: Transformer, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int = 16, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n, seqlen) int64, mask (n, seqlen) bool) of text sampled at temperature 1.

    Each sequence starts from the chat template's user turn when the tokenizer has one (and
    then samples through end-of-turn tokens), else from BOS (EOS if there is none), stopping
    at EOS. Sequence i is seeded with seed + i, so the result does not depend on batch_size.
    After a sequence ends the mask is False and the tokens are padding.
    """
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    chat_prefix = chat_prefix_ids(tokenizer)
    prompt = chat_prefix[: seqlen - 1] if chat_prefix else [start_id]
    if prompt == [None]:
        raise SliceserveError("the tokenizer has neither a BOS nor an EOS token to start generating from")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    engine = Engine(
        model,
        tokenizer,
        max_batch=min(batch_size, nsamples),
        max_model_len=seqlen,
        max_queue=nsamples,
        prefill_chunk=seqlen,
    )
    if tokenizer.eos_token_id is not None:
        engine.eos = {tokenizer.eos_token_id}
    events: queue.Queue = queue.Queue()
    outputs: list[list[int]] = [list(prompt) for _ in range(nsamples)]
    engine.start()
    try:
        for i in range(nsamples):
            params = SamplingParams(
                max_tokens=seqlen - len(prompt), temperature=1.0, seed=seed + i, ignore_eos=chat_prefix is not None
            )
            engine.submit(prompt, params, lambda event, i=i: events.put((i, event)))
        with tqdm(
            total=nsamples * (seqlen - len(prompt)),
            desc="generating calibration text",
            unit="tok",
            disable=not progress,
        ) as bar:
            done = 0
            while done < nsamples:
                i, event = events.get()
                outputs[i] += event.token_ids
                bar.update(len(event.token_ids))
                if event.finished:
                    if event.finish_reason not in ("stop", "length"):
                        raise SliceserveError(
                            f"generating calibration text failed: {event.error or event.finish_reason}"
                        )
                    bar.update(seqlen - len(outputs[i]))
                    done += 1
    finally:
        engine.shutdown()
    tokens = torch.full((nsamples, seqlen), pad_id, dtype=torch.long)
    mask = torch.zeros(nsamples, seqlen, dtype=torch.bool)
    for i, ids in enumerate(outputs):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = True
    return tokens, mask


def cached_generated_windows(
    cache_file: Path,
    key: dict,
    model_loader: Callable[[], Transformer],
    tokenizer,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`generated_token_windows` for `key` (its "nsamples", "seqlen" and "seed", and whatever
    names the model, as "source"), read from `cache_file` when a run with the same key wrote it.

    Sampling takes minutes on a CPU and its result does not depend on what it is used for (the
    sparsity, the fine-tuning), so it is done once per key. The file is written whole under a
    temporary name and renamed, so an interrupted run never leaves a cache that looks complete;
    a file whose stored key differs (or that cannot be read) is sampled again and replaced.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    stored_key = json.dumps(key, sort_keys=True)
    if cache_file.is_file():
        try:
            with safe_open(str(cache_file), framework="pt") as cached:
                if cached.metadata().get("key") == stored_key:
                    return cached.get_tensor("tokens"), cached.get_tensor("mask")
        except Exception:  # truncated or foreign file: sample again
            pass
    tokens, mask = generated_token_windows(
        model_loader(), tokenizer, key["nsamples"], key["seqlen"], key["seed"], batch_size, progress
    )
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_name(f".{cache_file.name}.partial-{os.getpid()}")
    save_file({"tokens": tokens, "mask": mask}, str(partial), metadata={"key": stored_key})
    os.replace(partial, cache_file)
    return tokens, mask
