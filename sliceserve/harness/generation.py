"""Greedy generation until a stop string, for lm-eval's generate_until: simple on purpose
(every step runs the whole sequence again, no KV cache), since the paper's tasks only score."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sliceserve.harness.scoring import MIN_ROW


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(ends)], True) if ends else (text, False)


@torch.inference_mode()
def greedy_until(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt: list[int],
    *,
    decode: Callable[[list[int]], str],
    stops: list[str],
    max_new_tokens: int,
    stop_token_id: int | None,
) -> str:
    """The greedy continuation of `prompt`, as text, ending before the first stop string, at
    the stop token, or after max_new_tokens."""
    tokens, new = list(prompt), []
    for _ in range(max_new_tokens):
        row = tokens + [tokens[-1]] * (MIN_ROW - len(tokens))  # right padding: see scoring.MIN_ROW
        next_token = int(logits_fn(torch.tensor([row]))[0, len(tokens) - 1].argmax())
        if next_token == stop_token_id:
            break
        tokens.append(next_token)
        new.append(next_token)
        text, stopped = cut_at_stop(decode(new), stops)
        if stopped:
            return text
    return decode(new)
