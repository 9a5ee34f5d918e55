"""Perplexity as the SliceGPT paper measures it: non-overlapping windows over one token stream.

    ppl = exp( sum of -log p(t[i+1] | t[..i]) / number of predictions )

Each window of ``seqlen`` tokens is scored on its own, so it makes ``seqlen - 1``
predictions; the remainder that does not fill a window is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from sliceserve.errors import SliceserveError

_NLL_CHUNK = 256  # positions per float64 log-softmax: bounds memory at chunk * vocab * 8 bytes


def evaluation_tokens(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, special tokens as the tokenizer adds them (as the paper)."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long).reshape(-1)


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log softmax(logits)[target] in float64; logits (b, n, vocab), targets (b, n)."""
    total = 0.0
    for start in range(0, targets.shape[1], _NLL_CHUNK):
        chunk = logits[:, start : start + _NLL_CHUNK].double().log_softmax(dim=-1)
        picked = chunk.gather(-1, targets[:, start : start + _NLL_CHUNK, None])
        total -= picked.sum().item()
    return total


@torch.no_grad()
def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``logits_fn`` (batch (b, seqlen) int64 -> logits (b, seqlen, vocab)).

    Returns ``{"ppl", "tokens" (predictions scored), "windows"}``.
    """
    if seqlen < 2 or (max_windows is not None and max_windows < 1):
        raise SliceserveError(f"perplexity needs seqlen >= 2 and max_windows >= 1 (got {seqlen}, {max_windows})")
    tokens = tokens.reshape(-1).long()
    windows = tokens.numel() // seqlen
    if windows == 0:
        raise SliceserveError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    if max_windows is not None:
        windows = min(windows, max_windows)
    batches = tokens[: windows * seqlen].reshape(windows, seqlen).split(batch_size)
    total_nll, scored = 0.0, 0
    with tqdm(total=windows, desc="perplexity", unit="window", disable=not progress) as bar:
        for batch in batches:
            logits = logits_fn(batch)
            targets = batch[:, 1:].to(logits.device)
            total_nll += _summed_nll(logits[:, :-1], targets)
            scored += targets.numel()
            bar.update(batch.shape[0])
    return {"ppl": math.exp(total_nll / scored), "tokens": scored, "windows": windows}
