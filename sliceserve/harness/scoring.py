"""Scoring continuations: log P(continuation | context) and whether greedy decoding would have
produced it, for a batch of (context, continuation) token lists in one forward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sliceserve.errors import SliceserveError

# A row of one token would run the fast path's one-token decode graphs, which are captured
# per cache; right padding to two positions changes no score (attention is causal).
MIN_ROW = 2


def model_inputs(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The tokens the model reads: context + continuation less its last token, cut from the
    left to `max_length` (as lm-eval's Hugging Face model does)."""
    if not continuation:
        raise SliceserveError("lm-eval asked to score an empty continuation")
    if len(continuation) > max_length:
        raise SliceserveError(f"a continuation of {len(continuation)} tokens exceeds the {max_length} scored at once")
    return (context + continuation)[-(max_length + 1) :][:-1]


@torch.inference_mode()
def score_continuations(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    pairs: list[tuple[list[int], list[int]]],
    *,
    max_length: int,
    pad_id: int,
) -> list[tuple[float, bool]]:
    """(sum of the continuation's token log-probabilities, every token the argmax) per pair.

    The rows are right-padded into one batch: padding after a row's last token cannot change
    what a causal model computes before it. Log-softmax runs in float32 on the continuation's
    rows only, so the (batch, length, vocab) logits are never copied whole."""
    if not pairs:
        return []
    rows = [model_inputs(context, continuation, max_length) for context, continuation in pairs]
    batch = torch.full((len(rows), max(MIN_ROW, *map(len, rows))), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row)
    logits = logits_fn(batch)
    scores = []
    for i, (row, (_, continuation)) in enumerate(zip(rows, pairs)):
        logprobs = logits[i, len(row) - len(continuation) : len(row)].float().log_softmax(dim=-1)
        target = torch.tensor(continuation, device=logprobs.device)
        total = logprobs.gather(-1, target[:, None]).sum()
        scores.append((float(total), bool((logprobs.argmax(dim=-1) == target).all())))
    return scores
