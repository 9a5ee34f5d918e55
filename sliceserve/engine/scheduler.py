"""Who runs in the next step: every decoding request, and prompt chunks up to a token budget.

Each step carries one decode row for every running request that has finished its prompt, then
spends what is left of `token_budget` on prompt chunks: first of requests already part-way
through their prompts (oldest first), then of waiting requests admitted into free slots (first
come, first served). A chunk is at most `prefill_chunk` tokens, so a long prompt never stalls
the running streams for its whole prefill, and a burst of short prompts is prefilled together
in a few steps. One decode row per running request is always scheduled, whatever the budget.

While some requests decode, a step may carry fewer tokens (`decoding_budget`): a prompt chunk
beside the decode rows then costs little more than the rows alone, since a step of a few hundred
rows still reads every weight once, and a burst admitted over several such steps ends spread
out, so the next burst's prompts ride along other requests' decode steps (as Sarathi-Serve's
token budget does). With nothing decoding, the whole `token_budget` goes to prompts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sliceserve.engine.requests import Request


@dataclass
class StepPlan:
    decode: list[Request] = field(default_factory=list)
    prefill: list[tuple[Request, int, int]] = field(default_factory=list)  # (request, start, end) of its prompt
    admitted: list[Request] = field(default_factory=list)  # taken from the queue into a slot this step
    folded: list[Request] = field(default_factory=list)  # decode rows the engine runs inside the prefill

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


def plan_step(
    running: list[Request],
    waiting: deque[Request],
    free_slots: int,
    *,
    token_budget: int,
    prefill_chunk: int,
    decoding_budget: int | None = None,
    admit: Callable[[Request], None],
) -> StepPlan:
    """The next step's work. Admitted requests are popped from `waiting` (at most `free_slots`)
    and handed to `admit` before their first chunk is planned (it gives them a slot, and may
    find part of their prompt already cached: their chunk starts after it). `decoding_budget`
    (default `token_budget`, never more) bounds the step instead while any request decodes."""
    plan = StepPlan(decode=[r for r in running if r.decoding])
    step_tokens = (decoding_budget or token_budget) if plan.decode else token_budget
    budget = step_tokens - len(plan.decode)

    def add_chunk(request: Request) -> None:
        nonlocal budget
        end = min(len(request.prefill_ids), request.prefilled + prefill_chunk, request.prefilled + budget)
        plan.prefill.append((request, request.prefilled, end))
        budget -= end - request.prefilled

    for request in running:
        if budget > 0 and not request.decoding:
            add_chunk(request)
    while budget > 0 and waiting and len(plan.admitted) < free_slots:
        request = waiting.popleft()
        plan.admitted.append(request)
        admit(request)
        add_chunk(request)
    return plan
