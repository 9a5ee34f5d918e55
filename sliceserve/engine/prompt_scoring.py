"""Prompt scoring: the log-probability of each prompt token given the tokens before it.

A request that asks for prompt logprobs has its prefill chunks return the logits of every
position (PrefillChunk.all_positions). Row j of a chunk that starts at position s holds the
logits at position s + j, which score prompt token s + j + 1; the prompt's last position scores
no prompt token (its logits choose the first generated one). As the sampler's logprobs, these
are log_softmax in float32 of the raw logits. A step's scores come back to the host in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sliceserve.uploads import upload

# (token id, logprob, rank, top (id, logprob) pairs, most likely first)
PromptTokenScore = tuple[int, float, int, list[tuple[int, float]]]


@dataclass
class ChunkScores:
    """The scores of the prompt tokens one chunk's logits predict, still on the device."""

    owner: object  # the request
    targets: list[int]  # the prompt tokens scored, in order
    top: int
    packed: Tensor  # float64: logprobs (T), ranks (T), top ids (T * top), top logprobs (T * top)


def score_chunk(owner: object, logits: Tensor, prompt: list[int], start: int, top: int) -> ChunkScores | None:
    """Scores of prompt[start + 1 : start + len(logits) + 1] from a chunk's logits (rows, vocab)."""
    targets = prompt[start + 1 : start + 1 + logits.shape[0]]
    if not targets:
        return None
    logprobs = logits[: len(targets)].float().log_softmax(dim=-1)
    target_ids = upload(targets, logprobs.device)
    chosen = logprobs.gather(1, target_ids[:, None])[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top = min(top, logprobs.shape[1])
    parts = [chosen.double(), ranks.double()]
    if top > 0:
        values, ids = logprobs.topk(top, dim=-1)
        parts += [ids.flatten().double(), values.flatten().double()]
    return ChunkScores(owner, targets, top, torch.cat(parts))


@dataclass
class StepScores:
    """Every chunk scored in one step."""

    chunks: list[ChunkScores] = field(default_factory=list)

    def add(self, scores: ChunkScores | None) -> None:
        if scores is not None:
            self.chunks.append(scores)

    def to_host(self) -> list[tuple[object, list[PromptTokenScore]]]:
        """Per chunk, its request and its tokens' scores, in one device->host copy."""
        if not self.chunks:
            return []
        flat = torch.cat([c.packed for c in self.chunks]).tolist()
        out, at = [], 0
        for c in self.chunks:
            T, k = len(c.targets), c.top
            chosen, ranks = flat[at : at + T], flat[at + T : at + 2 * T]
            ids, values = flat[at + 2 * T : at + 2 * T + T * k], flat[at + 2 * T + T * k : at + 2 * T + 2 * T * k]
            at += 2 * T + 2 * T * k
            scores = [
                (token, chosen[i], int(ranks[i]), [(int(ids[j]), values[j]) for j in range(i * k, (i + 1) * k)])
                for i, token in enumerate(c.targets)
            ]
            out.append((c.owner, scores))
        return out
