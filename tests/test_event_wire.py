"""Events packed for the pipe between the engine's process and the server's come back equal."""

from __future__ import annotations

import pickle

from sliceserve.engine.event_wire import packed, unpacked
from sliceserve.engine.requests import GenerationEvent, TokenLogprob


def round_trip(event: GenerationEvent) -> GenerationEvent:
    return unpacked(pickle.loads(pickle.dumps(packed(event))))


def test_a_plain_event_travels_as_a_tuple_and_comes_back_equal():
    for event in (
        GenerationEvent(" word", [1234], [], prompt_tokens=5, completion_tokens=3),
        GenerationEvent("", [], [], finish_reason="length", prompt_tokens=5, completion_tokens=16),
    ):
        assert isinstance(packed(event), tuple)
        assert round_trip(event) == event


def test_events_with_logprobs_prompt_logprobs_or_an_error_travel_whole():
    chosen = TokenLogprob(" a", 7, -0.5, [(" a", -0.5), (" b", -1.5)], [7, 8])
    for event in (
        GenerationEvent(" a", [7], [chosen], prompt_tokens=2, completion_tokens=1),
        GenerationEvent("x", [9], [], prompt_tokens=2, completion_tokens=1, prompt_logprobs=[None, chosen]),
        GenerationEvent("", [], [], finish_reason="error", error="internal error: boom"),
    ):
        assert isinstance(packed(event), GenerationEvent)
        assert round_trip(event) == event
