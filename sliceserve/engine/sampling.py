"""Choosing the next token: greedy, temperature, top-k, top-p, with a per-request generator."""

from __future__ import annotations

import torch

from sliceserve.engine.requests import SamplingParams, TokenLogprob


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Sample one token id from a row of logits (vocab,). Temperature 0 is greedy."""
    if params.temperature < 1e-5:  # below this, scores overflow: treat as greedy (as vLLM does)
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, top: int, decode) -> TokenLogprob:
    """The chosen token's log-probability under the model, and the top-n alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        alternatives = [(decode(int(i)), float(v)) for v, i in zip(values, ids)]
    return TokenLogprob(token=decode(token), token_id=token, logprob=float(logprobs[token]), top=alternatives)
