"""The generation engine on tiny real models: what a client of `Engine` is promised.

The main model is a random two-layer Llama (width 64), sliced at 25% by the real pipeline
and served in float32, with a real byte-level BPE tokenizer (trained on text that includes
"café ñ 日本語 🙂"). Its output rows for special tokens and for tokens that are not plain
ASCII are zeroed, so greedy text is clean ASCII that never ends on eos by itself; UTF-8
split across tokens is tested on a second model whose weights force a known token cycle.
Mistral (sliding window 8), OPT (learned positions) and Phi (parallel block, partial rotary)
tiny models, sliced the same way, check the KV cache of the other attention variants.

The reference for every greedy output is the model's own forward without a cache, rerun on
the growing sequence.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from server_support import bytes_to_unicode, plain_greedy, wide_random_llama
from tiny_models import calibration_batches, tiny_config, tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sliceserve.engine.engine import Engine, QueueFull, RequestRejected
from sliceserve.engine.requests import GenerationEvent, SamplingParams
from sliceserve.engine.text_reference import text_step
from sliceserve.model.decoder import Transformer
from sliceserve.model.loader import load_model
from sliceserve.slicing.checkpoint_writer import export_checkpoint, slice_checkpoint
from sliceserve.slicing.sources import FolderSource

EOS = "<|endoftext|>"
UNICODE_TEXT = "café ñ 日本語 🙂"
MAX_POSITIONS = 1024  # room for the long requests that cancellation and the queue need
LONG = 900  # max_tokens of a request that cannot end by itself during a test
CHUNK = 5  # prefill_chunk of the engines: 17-token prompts take four chunks
GREEDY = dict(temperature=0.0, ignore_eos=True)
SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "sul", "or", "ve", "an", "dis", "po", "que", "stra", "ni", "el", "bu"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the tokenizer and the models ----------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over all 256 bytes, so any UTF-8 character can be spelled byte by byte."""
    rng = random.Random(0)
    lines = [
        " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(12)) for _ in range(60)
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(lines + [UNICODE_TEXT] * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        bos_token=None,
        unk_token=None,
        pad_token=None,
        clean_up_tokenization_spaces=False,
    )


def byte_tokens(tokenizer, text: str) -> list[int]:
    """The single-byte tokens that spell `text`'s UTF-8 bytes (so multi-byte characters split)."""
    byte_chars = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([byte_chars[b] for b in text.encode()])


def is_ascii_token(tokenizer, token_id: int) -> bool:
    text = tokenizer.decode([token_id])
    return token_id not in tokenizer.all_special_ids and text.isascii() and text.isprintable() and text != ""


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def ascii_ids(tokenizer) -> list[int]:
    return [i for i in range(len(tokenizer)) if is_ascii_token(tokenizer, i)]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer, ascii_ids) -> Path:
    """A random float32 Llama as a Hugging Face folder (with its tokenizer); greedy decoding
    picks ASCII tokens only."""
    kept = torch.zeros(len(tokenizer), dtype=torch.bool)
    kept[ascii_ids] = True
    model = wide_random_llama(tokenizer, ~kept, max_positions=MAX_POSITIONS)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(llama_folder, tmp_path_factory) -> Transformer:
    out = tmp_path_factory.mktemp("llama_sliced") / "sliced"
    slice_checkpoint(FolderSource(llama_folder), out, calibration_batches(), sparsity=0.25, progress=False)
    model = load_model(out)
    assert model.layers[0].attn_shortcut is not None and model.head.weight.dtype == torch.float32
    return model


@pytest.fixture(scope="module")
def make_engine():
    """Engines made through this are shut down when the module ends."""
    engines = []

    def make(model: Transformer, tokenizer, *, start: bool = True, **settings) -> Engine:
        engine = Engine(model, tokenizer, **settings)
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


@pytest.fixture(scope="module")
def engine(make_engine, llama, tokenizer) -> Engine:
    return make_engine(llama, tokenizer, max_batch=4, prefill_chunk=CHUNK)


# ---- helpers -------------------------------------------------------------------------


@dataclass
class Outcome:
    events: list[GenerationEvent] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [t for event in self.events for t in event.token_ids]

    @property
    def text(self) -> str:
        return "".join(event.text for event in self.events)

    @property
    def last(self) -> GenerationEvent:
        return self.events[-1]


def run(engine: Engine, prompt_ids: list[int], **params) -> Outcome:
    return Outcome(list(engine.generate(prompt_ids, SamplingParams(**params))))


def run_together(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], watch=None) -> list[Outcome]:
    """Submit every request at once (then start the engine, if it was not), wait for all."""
    outcomes = [Outcome() for _ in prompts]
    done = threading.Semaphore(0)

    def listener(outcome: Outcome):
        def on_event(event: GenerationEvent) -> None:
            if watch is not None:
                watch()
            outcome.events.append(event)
            if event.finished:
                done.release()

        return on_event

    for prompt, p, outcome in zip(prompts, params, outcomes):
        engine.submit(prompt, p, listener(outcome))
    engine.start()
    for _ in prompts:
        assert done.acquire(timeout=60), "a request never finished"
    return outcomes


def prompt(ids: list[int], length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(ids) for _ in range(length)]


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    """Until the gauges say nothing runs or waits (they are updated at the end of each step:
    wait first for what makes the engine idle, or a stale reading passes at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats
        if stats.kv_slots_used == 0 and stats.running == 0 and stats.waiting == 0:
            return
        time.sleep(0.005)
    raise AssertionError(f"engine still busy: {engine.stats}")


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


# ---- 1. the KV cache -----------------------------------------------------------------


def test_greedy_through_the_cache_equals_greedy_without_it(engine, llama, ascii_ids):
    for seed, length in enumerate([1, 4, 5, 6, 11, 17]):  # around and across prefill chunks of 5
        prompt_ids = prompt(ascii_ids, length, seed)
        outcome = run(engine, prompt_ids, max_tokens=8, **GREEDY)
        assert outcome.ids == plain_greedy(llama, prompt_ids, 8), f"prompt of {length} tokens"


@pytest.fixture(scope="module", params=["mistral", "opt", "phi"])
def family_model(request, tmp_path_factory, tokenizer) -> Transformer:
    """Tiny float64 models of the other attention variants, sliced at 25%."""
    config = tiny_config(request.param)
    config.vocab_size = len(tokenizer)
    folder = tmp_path_factory.mktemp(request.param)
    tiny_model(config, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = folder / "sliced"
    slice_checkpoint(FolderSource(folder), out, calibration_batches(), sparsity=0.25, progress=False)
    return load_model(out)


def test_greedy_through_the_cache_equals_greedy_without_it_in_other_families(
    family_model, make_engine, tokenizer, ascii_ids
):
    spec = family_model.spec
    prompts, max_tokens = [prompt(ascii_ids, 17, 1), prompt(ascii_ids, 3, 2)], 10
    if spec.sliding_window is not None:
        assert spec.sliding_window < 17 + max_tokens
    engine = make_engine(family_model, tokenizer, max_batch=2, prefill_chunk=CHUNK)
    outcomes = run_together(engine, prompts, [SamplingParams(max_tokens=max_tokens, **GREEDY)] * 2)
    for prompt_ids, outcome in zip(prompts, outcomes):
        assert outcome.ids == plain_greedy(family_model, prompt_ids, max_tokens)


# ---- 2. batch invariance -------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [8, 3])
def test_concurrent_requests_give_what_each_gives_alone(max_batch, make_engine, llama, tokenizer, ascii_ids):
    lengths, max_tokens = [1, 2, 4, 5, 6, 9, 12, 17], [8, 5, 10, 3, 8, 6, 9, 4]
    prompts = [prompt(ascii_ids, n, 100 + i) for i, n in enumerate(lengths)]
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in max_tokens]
    engine = make_engine(llama, tokenizer, start=False, max_batch=max_batch, prefill_chunk=CHUNK)
    seen = []  # (running, waiting) as the engine thread sees them while sending events
    together = run_together(
        engine, prompts, params, watch=lambda: seen.append((engine.stats.running, engine.stats.waiting))
    )
    assert max(running for running, _ in seen) == max_batch
    if max_batch < len(prompts):
        assert max(waiting for _, waiting in seen) > 0
    for prompt_ids, p, outcome in zip(prompts, params, together):
        alone = run(engine, prompt_ids, max_tokens=p.max_tokens, **GREEDY)
        assert outcome.ids == alone.ids and outcome.text == alone.text
        assert len(outcome.ids) == p.max_tokens
    wait_idle(engine)


# ---- 3. sampling ---------------------------------------------------------------------


def test_a_seed_reproduces_a_sample_alone_and_in_a_batch(engine, ascii_ids):
    prompt_ids = prompt(ascii_ids, 6, 7)
    sampled = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    first, second = run(engine, prompt_ids, seed=7, **sampled), run(engine, prompt_ids, seed=7, **sampled)
    assert first.ids == second.ids and len(first.ids) == 12
    others = [prompt(ascii_ids, n, n) for n in (3, 9, 14)]
    batch = run_together(
        engine,
        [*others, prompt_ids],
        [SamplingParams(seed=s, **sampled) for s in (1, 2, 3)] + [SamplingParams(seed=7, **sampled)],
    )
    assert batch[-1].ids == first.ids


def test_different_seeds_give_different_samples(engine, ascii_ids):
    prompt_ids = prompt(ascii_ids, 6, 7)
    samples = [run(engine, prompt_ids, seed=s, max_tokens=16, temperature=1.0, ignore_eos=True).ids for s in (1, 2)]
    assert samples[0] != samples[1]


def test_top_k_one_and_a_tiny_top_p_are_greedy(engine, ascii_ids):
    prompt_ids = prompt(ascii_ids, 8, 8)
    greedy = run(engine, prompt_ids, max_tokens=10, **GREEDY).ids
    sampled = dict(max_tokens=10, temperature=1.0, ignore_eos=True)
    assert run(engine, prompt_ids, top_k=1, seed=3, **sampled).ids == greedy
    assert run(engine, prompt_ids, top_p=1e-6, seed=4, **sampled).ids == greedy


def test_logprobs_are_the_models_and_the_top_ones_are_sorted(engine, llama, ascii_ids):
    prompt_ids = prompt(ascii_ids, 7, 9)
    for params in (dict(**GREEDY), dict(temperature=1.0, seed=5, ignore_eos=True)):
        outcome = run(engine, prompt_ids, max_tokens=6, logprobs=3, **params)
        sequence = list(prompt_ids)
        for event in outcome.events:
            (chosen,) = event.logprobs
            (token,) = event.token_ids
            assert chosen.token_id == token
            with torch.inference_mode():
                expected = torch.log_softmax(llama(torch.tensor([sequence]))[0, -1].double(), dim=-1)
            assert abs(chosen.logprob - float(expected[token])) < 1e-4
            values = [value for _, value in chosen.top]
            assert len(chosen.top) == 3 and values == sorted(values, reverse=True)
            assert abs(values[0] - float(expected.max())) < 1e-4
            if params["temperature"] == 0:
                assert chosen.logprob == values[0]
            sequence.append(token)
        assert len(outcome.ids) == 6


# ---- 4. stop strings, eos, lengths ---------------------------------------------------


@pytest.fixture(scope="module")
def baseline(engine, ascii_ids, tokenizer):
    """A greedy output of 16 tokens, and its prompt."""
    prompt_ids = prompt(ascii_ids, 5, 11)
    outcome = run(engine, prompt_ids, max_tokens=16, **GREEDY)
    assert outcome.text == tokenizer.decode(outcome.ids)
    return prompt_ids, outcome


def test_length_and_token_counts(engine, baseline):
    prompt_ids, full = baseline
    assert full.last.finish_reason == "length"
    assert (full.last.prompt_tokens, full.last.completion_tokens) == (len(prompt_ids), 16) == (5, len(full.ids))
    short = run(engine, prompt_ids, max_tokens=1, **GREEDY)
    assert short.ids == full.ids[:1] and short.last.finish_reason == "length" and short.last.completion_tokens == 1
    assert all(not e.finished for e in full.events[:-1]) and full.last.finished


@pytest.mark.parametrize("first, last", [(5, 8), (2, 3), (0, 2)])  # stop strings of 3, 1 and 2 tokens
def test_output_ends_before_a_stop_string(engine, baseline, tokenizer, first, last):
    prompt_ids, full = baseline
    stop = tokenizer.decode(full.ids[first:last])
    outcome = run(engine, prompt_ids, max_tokens=16, stop=["zzzz", stop], **GREEDY)
    # the engine stops at the first output prefix whose text contains the stop string
    steps = next(k for k in range(1, 17) if stop in tokenizer.decode(full.ids[:k]))
    assert outcome.text == full.text[: full.text.find(stop)]
    assert stop not in outcome.text
    assert outcome.last.finish_reason == "stop"
    assert outcome.ids == full.ids[:steps] and outcome.last.completion_tokens == steps


def test_a_stop_string_that_never_appears_changes_nothing(engine, baseline):
    prompt_ids, full = baseline
    outcome = run(engine, prompt_ids, max_tokens=16, stop=["zzzz", full.text[-3:] + "qq"], **GREEDY)
    assert outcome.ids == full.ids and outcome.text == full.text and outcome.last.finish_reason == "length"


def test_eos_ends_with_stop_unless_ignored(make_engine, llama, tokenizer, baseline):
    prompt_ids, full = baseline
    eos = full.ids[6]
    at = full.ids.index(eos)
    engine = make_engine(llama, tokenizer, max_batch=2, prefill_chunk=CHUNK)
    engine.eos = {eos}
    outcome = run(engine, prompt_ids, max_tokens=16, temperature=0.0)
    assert outcome.ids == full.ids[: at + 1]
    assert outcome.last.finish_reason == "stop" and outcome.last.completion_tokens == at + 1
    assert outcome.text == tokenizer.decode(full.ids[:at])  # the eos token is not text
    ignored = run(engine, prompt_ids, max_tokens=16, temperature=0.0, ignore_eos=True)
    assert ignored.ids == full.ids and ignored.last.finish_reason == "length"


# ---- 5. incremental detokenization ---------------------------------------------------


def test_text_step_never_sends_half_a_character(tokenizer):
    for ids in (byte_tokens(tokenizer, UNICODE_TEXT), tokenizer(UNICODE_TEXT)["input_ids"]):
        assert tokenizer.decode(ids) == UNICODE_TEXT
        sent, deltas = 0, []
        for k in range(1, len(ids) + 1):
            step = text_step(tokenizer.decode(ids[:k]), sent, [], final=k == len(ids))
            assert "\ufffd" not in step.delta and not step.stopped
            sent += len(step.delta)
            deltas.append(step.delta)
        assert "".join(deltas) == UNICODE_TEXT
    assert text_step("ab\ufffd", 0, [], final=True).delta == "ab\ufffd"  # the last step flushes


def test_text_step_holds_back_what_may_become_a_stop_string():
    assert text_step("x caf", 0, ["café"], final=False).delta == "x "
    assert text_step("x caf\ufffd", 0, ["café"], final=False).delta == "x "  # é still incomplete
    assert text_step("x café!", 2, ["café"], final=False) == text_step("x café!", 2, ["café"], final=True)
    assert text_step("x café!", 2, ["café"], final=False).stopped


@pytest.fixture(scope="module")
def cycle(llama_folder, tmp_path_factory, tokenizer, make_engine):
    """An engine over a dense Llama whose weights make greedy decoding repeat one token cycle.

    The residual writers (o, down) are zero, so the stream is the embedding; the embedding of
    the cycle's i-th token is the basis vector e_i, and the head maps e_i to the next token.
    The cycle spells "é 🙂日k" byte by byte: every multi-byte character is split over tokens.
    """
    ids = byte_tokens(tokenizer, "k" + "é 🙂日")
    assert len(set(ids)) == len(ids) == 11
    out = tmp_path_factory.mktemp("llama_dense") / "dense"
    export_checkpoint(FolderSource(llama_folder), out, progress=False)
    model = load_model(out)
    with torch.no_grad():
        for block in model.layers:
            block.attn.o.weight.zero_()
            block.mlp.down.weight.zero_()
        model.embed.weight.zero_()
        model.head.weight.zero_()
        for i, token in enumerate(ids):
            model.embed.weight[token, i] = 1.0
            model.head.weight[ids[(i + 1) % len(ids)], i] = 10.0
    return make_engine(model, tokenizer, max_batch=2, prefill_chunk=CHUNK), ids


def test_streamed_text_never_contains_a_broken_character(cycle, tokenizer):
    engine, ids = cycle
    for max_tokens in (22, 13, 6):  # ends after "k", after "🙂", inside "🙂"
        outcome = run(engine, ids[:1], max_tokens=max_tokens, **GREEDY)
        assert outcome.ids == [ids[(i + 1) % 11] for i in range(max_tokens)]
        whole = tokenizer.decode(outcome.ids)
        assert outcome.text == whole
        assert all("\ufffd" not in e.text for e in outcome.events[:-1])
        assert ("\ufffd" in whole) == (max_tokens == 6)
    assert run(engine, ids[:1], max_tokens=22, **GREEDY).text == "é 🙂日k" * 2


def test_streamed_text_over_async_streams_is_the_same(cycle):
    engine, ids = cycle

    async def read() -> list[str]:
        return [event.text async for event in engine.stream(ids[:1], SamplingParams(max_tokens=22, **GREEDY))]

    deltas = asyncio.run(read())
    assert "".join(deltas) == "é 🙂日k" * 2 and all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop, expected", [("🙂日", "é "), ("ké", "é 🙂日"), ("é", ""), ("日k", "é 🙂")])
def test_a_stop_string_split_inside_characters(cycle, stop, expected):
    engine, ids = cycle
    outcome = run(engine, ids[:1], max_tokens=30, stop=[stop], **GREEDY)
    assert outcome.text == expected and outcome.last.finish_reason == "stop"
    assert all("\ufffd" not in e.text for e in outcome.events)


# ---- 6. cancellation -----------------------------------------------------------------


def test_closing_a_generator_cancels_its_request_and_frees_the_slot(engine, ascii_ids):
    cancelled = engine.stats.finished["cancelled"]
    generator = engine.generate(prompt(ascii_ids, 4, 1), SamplingParams(max_tokens=LONG, **GREEDY))
    assert not next(generator).finished
    generator.close()
    wait_until(lambda: engine.stats.finished["cancelled"] == cancelled + 1)
    wait_idle(engine)
    assert engine.running == [] and not engine.waiting and len(engine.free_slots) == engine.max_batch


def test_closing_an_async_stream_cancels_its_request_and_frees_the_slot(engine, ascii_ids):
    cancelled = engine.stats.finished["cancelled"]

    async def read_two() -> None:
        stream = engine.stream(prompt(ascii_ids, 4, 2), SamplingParams(max_tokens=LONG, **GREEDY))
        for _ in range(2):
            assert not (await anext(stream)).finished
        await stream.aclose()

    asyncio.run(read_two())
    wait_until(lambda: engine.stats.finished["cancelled"] == cancelled + 1)
    wait_idle(engine)
    assert engine.running == [] and not engine.waiting and len(engine.free_slots) == engine.max_batch


@pytest.fixture(scope="module")
def one_slot(make_engine, llama, tokenizer) -> Engine:
    return make_engine(llama, tokenizer, max_batch=1, max_queue=2, prefill_chunk=CHUNK)


def test_a_cancelled_waiting_request_never_runs(one_slot, ascii_ids):
    engine = one_slot
    running, waiting = Outcome(), Outcome()
    long = SamplingParams(max_tokens=LONG, **GREEDY)
    first = engine.submit(prompt(ascii_ids, 3, 1), long, running.events.append)
    wait_until(lambda: engine.stats.running == 1)
    second = engine.submit(prompt(ascii_ids, 3, 2), long, waiting.events.append)
    wait_until(lambda: engine.stats.waiting == 1)
    engine.cancel(second)
    wait_until(lambda: waiting.events)
    assert not running.events[-1].finished  # the first request still holds the only slot
    engine.cancel(first)
    wait_until(lambda: running.last.finished)
    wait_idle(engine)
    assert second.slot is None and second.output_ids == [] and second.prefilled == 0
    assert waiting.ids == [] and waiting.text == ""
    assert [e.finish_reason for e in waiting.events] == ["cancelled"]
    assert running.last.finish_reason == "cancelled" and 0 < len(running.ids) < LONG


# ---- 7. limits -----------------------------------------------------------------------


def test_a_full_queue_refuses_at_once(one_slot, ascii_ids):
    engine = one_slot
    long = SamplingParams(max_tokens=LONG, **GREEDY)
    requests = [engine.submit(prompt(ascii_ids, 3, 1), long, lambda e: None)]
    wait_until(lambda: engine.stats.running == 1)
    requests += [engine.submit(prompt(ascii_ids, 3, i), long, lambda e: None) for i in (2, 3)]
    started = time.perf_counter()
    with pytest.raises(QueueFull):
        engine.submit(prompt(ascii_ids, 3, 4), long, lambda e: None)
    assert time.perf_counter() - started < 0.5
    for request in requests:
        engine.cancel(request)
    wait_idle(engine)
    assert run(engine, prompt(ascii_ids, 3, 5), max_tokens=3, **GREEDY).last.finish_reason == "length"


def test_impossible_requests_are_rejected(engine, llama, ascii_ids):
    vocab = llama.spec.vocab_size
    cases = [
        ([], SamplingParams(max_tokens=4)),
        (prompt(ascii_ids, 3, 1), SamplingParams(max_tokens=-2)),
        (prompt(ascii_ids, 30, 1), SamplingParams(max_tokens=engine.max_model_len - 29)),
        ([ascii_ids[0], vocab], SamplingParams(max_tokens=4)),
        ([-1, ascii_ids[0]], SamplingParams(max_tokens=4)),
    ]
    for prompt_ids, params in cases:
        with pytest.raises(RequestRejected):
            engine.submit(prompt_ids, params, lambda e: None)
        with pytest.raises(RequestRejected):
            next(engine.generate(prompt_ids, params))
    # the longest request that fits is accepted
    fits = run(engine, [ascii_ids[0]] * (engine.max_model_len - 2), max_tokens=2, **GREEDY)
    assert fits.last.finish_reason == "length" and len(fits.ids) == 2
    # max_tokens 0 is a prefill alone (prompt scoring): it ends at once, having generated nothing
    scored = run(engine, prompt(ascii_ids, 3, 1), max_tokens=0)
    assert scored.last.finish_reason == "length" and scored.ids == []


# ---- 8. the engine survives ----------------------------------------------------------


def test_the_engine_still_serves_after_everything(engine, llama, ascii_ids):
    wait_idle(engine)
    assert engine.thread is not None and engine.thread.is_alive()
    assert engine.stats.finished["error"] == 0
    assert sorted(engine.free_slots) == list(range(engine.max_batch))
    prompt_ids = prompt(ascii_ids, 12, 99)
    outcome = run(engine, prompt_ids, max_tokens=8, **GREEDY)
    assert outcome.ids == plain_greedy(llama, prompt_ids, 8) and outcome.last.finish_reason == "length"
