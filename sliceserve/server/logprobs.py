"""Logprobs in the answers' shapes: OpenAI's completions and chat shapes, vLLM's prompt_logprobs.

Tokens are named by engine/token_pieces.py: their text, "bytes:\\xe4\\xb8" for a token that
holds part of a UTF-8 character, or "token_id:N" when the request sets return_tokens_as_token_ids.
A completions top_logprobs dict is keyed by those names; should two alternatives still share
one (two pieces that decode alike), the later is keyed "token_id:N", so n asked gives n entries.
"""

from __future__ import annotations

from sliceserve.engine.requests import TokenLogprob
from sliceserve.engine.token_pieces import TokenPieces

LOWEST = -9999.0  # what -inf is sent as (JSON has no infinities), as vLLM does


def finite(logprob: float) -> float:
    return max(logprob, LOWEST)


class LogprobsWriter:
    def __init__(self, pieces: TokenPieces, as_ids: bool = False):
        self.pieces, self.as_ids = pieces, as_ids

    def name(self, token_id: int) -> str:
        return self.pieces.name(token_id, self.as_ids)

    def top_dict(self, lp: TokenLogprob, n: int | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for token_id, (_, value) in zip(lp.top_ids, lp.top[:n]):
            key = self.name(token_id)
            out[f"token_id:{token_id}" if key in out else key] = finite(value)
        return out

    def completion(self, logprobs: list[TokenLogprob], offset: int) -> dict:
        """OpenAI's legacy shape; text_offset counts characters from `offset` on."""
        offsets = []
        for lp in logprobs:
            offsets.append(offset)
            offset += len(lp.token)
        return {
            "tokens": [self.name(lp.token_id) for lp in logprobs],
            "token_logprobs": [finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [self.top_dict(lp) for lp in logprobs],
            "text_offset": offsets,
        }

    def echoed(self, prompt_ids: list[int], scored: list[TokenLogprob | None], offsets: list[int], n: int) -> dict:
        """The prompt's part of a completion's logprobs under echo: null for the first token."""
        return {
            "tokens": [self.name(t) for t in prompt_ids],
            "token_logprobs": [None if lp is None else finite(lp.logprob) for lp in scored],
            "top_logprobs": [None if lp is None else self.top_dict(lp, n) for lp in scored],
            "text_offset": offsets,
        }

    def prompt_logprobs(self, scored: list[TokenLogprob | None], n: int) -> list[dict | None]:
        """vLLM's shape: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} of the token itself and the top n."""
        out: list[dict | None] = []
        for lp in scored:
            if lp is None:
                out.append(None)
                continue
            entries = {lp.token_id: (lp.logprob, lp.rank)}
            for rank, (token_id, (_, value)) in enumerate(zip(lp.top_ids, lp.top[:n]), start=1):
                entries.setdefault(token_id, (value, rank))
            out.append(
                {
                    str(t): {"logprob": finite(v), "rank": r, "decoded_token": self.name(t)}
                    for t, (v, r) in entries.items()
                }
            )
        return out

    def chat_entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.name(token_id), "logprob": finite(logprob), "bytes": list(self.pieces.bytes(token_id))}

    def chat(self, logprobs: list[TokenLogprob]) -> dict:
        return {
            "content": [
                {
                    **self.chat_entry(lp.token_id, lp.logprob),
                    "top_logprobs": [self.chat_entry(t, v) for t, (_, v) in zip(lp.top_ids, lp.top)],
                }
                for lp in logprobs
            ]
        }


def joined(*parts: dict) -> dict:
    """Completion logprobs of consecutive tokens as one object."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [value for part in parts for value in part[key]] for key in keys}
