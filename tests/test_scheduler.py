"""The step planner (engine/scheduler.py): decode rows first, prompt chunks up to the budget."""

from __future__ import annotations

from collections import deque

from sliceserve.engine.requests import Request, SamplingParams
from sliceserve.engine.scheduler import plan_step


def waiting_request(prompt_len: int) -> Request:
    return Request(list(range(prompt_len)), SamplingParams(max_tokens=8), on_event=lambda event: None)


def decoding_request(prompt_len: int) -> Request:
    request = waiting_request(prompt_len)
    request.prefilled, request.output_ids = prompt_len, [1]
    return request


def plan(running, waiting, **budgets):
    free = iter(range(100))
    return plan_step(
        running, waiting, free_slots=100, prefill_chunk=256, admit=lambda r: setattr(r, "slot", next(free)), **budgets
    )


def prompt_tokens(step) -> int:
    return sum(end - start for _, start, end in step.prefill)


def test_with_nothing_decoding_the_whole_budget_goes_to_prompts():
    waiting = deque(waiting_request(256) for _ in range(20))
    step = plan([], waiting, token_budget=4096, decoding_budget=512)
    assert prompt_tokens(step) == 4096 and len(step.admitted) == 16 and len(waiting) == 4


def test_while_requests_decode_the_step_keeps_to_the_decoding_budget():
    running = [decoding_request(256) for _ in range(64)]
    waiting = deque(waiting_request(256) for _ in range(20))
    step = plan(running, waiting, token_budget=4096, decoding_budget=512)
    assert len(step.decode) == 64
    assert prompt_tokens(step) == 512 - 64  # one whole prompt and part of the next
    assert [end - start for _, start, end in step.prefill] == [256, 192]


def test_without_a_decoding_budget_decoding_steps_take_the_whole_budget():
    running = [decoding_request(256) for _ in range(64)]
    waiting = deque(waiting_request(256) for _ in range(20))
    step = plan(running, waiting, token_budget=4096)
    assert prompt_tokens(step) == 4096 - 64


def test_a_prompt_part_way_through_goes_on_before_new_ones_are_admitted():
    started = waiting_request(600)
    started.prefilled, started.slot = 256, 0
    running = [decoding_request(16), started]
    waiting = deque([waiting_request(100)])
    step = plan(running, waiting, token_budget=4096, decoding_budget=300)
    assert step.prefill[0] == (started, 256, 512)  # a chunk is at most prefill_chunk tokens
    assert step.prefill[1][1:] == (0, 300 - 1 - 256)
