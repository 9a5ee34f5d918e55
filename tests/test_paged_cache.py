"""The paged KV cache: the same numbers as the reserved one, and an engine whose requests share
blocks, wait for them, and are preempted and recomputed when they run out.

Model level: every family's reference decoder gives the same logits, bit for bit, whether its
keys live in reserved rows or in blocks scattered over a shuffled table. Engine level: a
tiny sliced Llama (server_support) serves the same greedy and seeded outputs with a
cache far too small for all its requests at once as with a reserved one.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading

import httpx
import pytest
import torch
from cli_support import assert_one_line_error, run_sliceserve, served_url
from server_support import build_checkpoint, shut_down_after
from tiny_models import NoTokenizerSource, save_tiny_model, tiny_config, tiny_model

from sliceserve.engine.engine import DEFAULT_TOKEN_BUDGET, Engine, RequestRejected
from sliceserve.engine.requests import SamplingParams
from sliceserve.model.kv_cache import KVCache, PrefillChunk
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.slicing.checkpoint_writer import export_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def scattered_cache(model, slots: int, max_len: int, seed: int = 0) -> KVCache:
    """A paged cache whose slots hold blocks in a shuffled order, interleaved between slots."""
    per_slot = -(-max_len // 16)
    cache = model.new_cache(slots=slots, max_len=max_len, blocks=slots * per_slot + 1)
    blocks = list(range(1, cache.num_blocks))
    random.Random(seed).shuffle(blocks)
    cache.assign_blocks([(s, i, blocks[s * per_slot + i]) for s in range(slots) for i in range(per_slot)])
    return cache


@pytest.mark.parametrize("variant", ["llama", "mistral", "opt", "phi"])
@torch.no_grad()
def test_paged_logits_equal_reserved(variant, tmp_path):
    save_tiny_model(variant, tmp_path / "hf")
    model = load_model(export_checkpoint(NoTokenizerSource(tmp_path / "hf"), tmp_path / "dense", progress=False))
    reserved = model.new_cache(slots=3, max_len=64)
    paged = scattered_cache(model, slots=3, max_len=64)
    assert paged.paged and not reserved.paged and paged.block_size == 16
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.spec.vocab_size, (n,), generator=generator).tolist() for n in (21, 7, 35)]
    chunks = [PrefillChunk(p[:16], 0, s) for s, p in enumerate(prompts)]
    chunks += [PrefillChunk(p[16:], 16, s) for s, p in enumerate(prompts) if len(p) > 16]
    first, second = model.prefill(chunks, reserved), model.prefill(chunks, paged)
    assert torch.equal(first, second)
    tokens = first[-3:].argmax(-1) if len(first) >= 3 else first.argmax(-1)
    positions = torch.tensor([len(p) for p in prompts])
    slots = torch.arange(3)
    for step in range(20):  # decoding crosses block boundaries (and Mistral's window of 8)
        a = model.forward_cached(tokens[:, None], (positions + step)[:, None], slots, reserved)
        b = model.forward_cached(tokens[:, None], (positions + step)[:, None], slots, paged)
        assert torch.equal(a, b)
        tokens = a[:, 0].argmax(-1)


@torch.no_grad()
def test_fast_path_paged_logits_equal_reserved(tmp_path):
    """The fast path's kernels (interpreted here) read and write the scattered blocks exactly
    where the reserved rows are: Mistral (GQA, a sliding window of 8)."""
    import kernel_support  # noqa: F401  (sets TRITON_INTERPRET before Triton loads)

    from sliceserve.fast.model import FastTransformer

    save_tiny_model("mistral", tmp_path / "hf")
    fast = FastTransformer(
        load_model(export_checkpoint(NoTokenizerSource(tmp_path / "hf"), tmp_path / "d", progress=False))
    )
    reserved = fast.new_cache(slots=2, max_len=48)
    paged = scattered_cache(fast, slots=2, max_len=48)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, fast.spec.vocab_size, (n,), generator=generator).tolist() for n in (19, 6)]
    chunks = [PrefillChunk(prompts[0][:12], 0, 0), PrefillChunk(prompts[1], 0, 1)]
    assert torch.equal(fast.prefill(chunks, reserved), fast.prefill(chunks, paged))
    chunks = [PrefillChunk(prompts[0][12:], 12, 0, all_positions=True), PrefillChunk([3], 6, 1)]
    first, second = fast.prefill(chunks, reserved), fast.prefill(chunks, paged)
    assert torch.equal(first, second)
    tokens, positions, slots = first[[6, 7]].argmax(-1), torch.tensor([19, 7]), torch.arange(2)
    for step in range(12):  # the second row crosses the block boundary at 16, the first the window's edge
        a = fast.forward_cached(tokens[:, None], (positions + step)[:, None], slots, reserved)
        b = fast.forward_cached(tokens[:, None], (positions + step)[:, None], slots, paged)
        assert torch.equal(a, b)
        tokens = a[:, 0].argmax(-1)


@torch.no_grad()
def test_prefill_warm_up_writes_only_the_scratch_slot(tmp_path):
    """The fast path's start-up prefills (run on CUDA before serving, to compile its kernels)
    touch no block a request holds, in a paged cache and in reserved rows shorter than they ask."""
    import kernel_support  # noqa: F401  (sets TRITON_INTERPRET before Triton loads)

    from sliceserve.fast.model import FastTransformer

    config = tiny_config("llama")
    config.num_hidden_layers = 1  # what holds for one layer's cache holds for each (the interpreter is slow)
    tiny_model(config).save_pretrained(tmp_path / "hf")
    fast = FastTransformer(
        load_model(export_checkpoint(NoTokenizerSource(tmp_path / "hf"), tmp_path / "d", progress=False))
    )
    for cache in (scattered_cache(fast, slots=2, max_len=64), fast.new_cache(slots=2, max_len=24)):
        for keys in cache.keys + cache.values:
            keys.normal_()
        held = [k.clone() for k in cache.keys + cache.values]
        fast.warm_up_prefill(cache)
        scratch = 0 if cache.paged else cache.scratch_slot  # the block the scratch slot's entries name
        for before, after in zip(held, cache.keys + cache.values):
            others = [b for b in range(cache.num_blocks) if b != scratch]
            assert torch.equal(before[others], after[others])
            assert not torch.equal(before[scratch], after[scratch])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("paged"))


@pytest.fixture(scope="module")
def served(checkpoint):
    return load_model(checkpoint), load_tokenizer(checkpoint)


def test_serve_sizes_the_cache_from_kv_cache_memory(checkpoint, tmp_path):
    """`sliceserve serve --kv-cache-memory 80KiB`: the tiny model's blocks take 8 KiB (2 layers, 2 kv
    heads of 16, 16 positions, keys and values in float32), so 10 blocks, 9 of them for requests."""
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "sliceserve",
        "serve",
        str(checkpoint),
        "--port",
        "0",
        "--kv-cache-memory",
        "80KiB",
    ]
    process = subprocess.Popen(command, text=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = served_url(process)
        answer = httpx.post(url + "/v1/completions", json={"prompt": "ka", "max_tokens": 4}, timeout=30).json()
        assert answer["usage"]["completion_tokens"] == 4
        too_long = httpx.post(url + "/v1/completions", json={"prompt": "ka " * 100, "max_tokens": 60}, timeout=30)
        assert too_long.status_code == 400 and "144 tokens" in too_long.json()["error"]["message"]
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert re.search(r"^sliceserve_kv_cache_blocks_total 9(\.0)?$", metrics, re.M), metrics
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.parametrize(
    "size,words",
    [
        ("0GiB", "--kv-cache-memory: the size '0GiB' must be more than zero"),
        ("lots", "--kv-cache-memory: the size 'lots'"),
    ],
)
def test_serve_refuses_a_bad_kv_cache_memory(checkpoint, tmp_path, size, words):
    result = run_sliceserve("serve", checkpoint, "--port", "0", "--kv-cache-memory", size, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, words)


def test_serve_takes_its_token_budget_from_max_num_batched_tokens(checkpoint):
    from sliceserve.cli import build_parser
    from sliceserve.commands.serving import make_engine

    args = build_parser().parse_args(
        ["serve", str(checkpoint), "--max-batch", "4", "--max-num-batched-tokens", "96", "--no-engine-process"]
    )
    engine = make_engine(str(checkpoint), args)
    with shut_down_after(engine):
        assert engine.token_budget == 96 and engine.decoding_budget == 96
    args = build_parser().parse_args(
        ["serve", str(checkpoint), "--max-batch", "4", "--max-tokens-while-decoding", "40", "--no-engine-process"]
    )
    engine = make_engine(str(checkpoint), args)
    with shut_down_after(engine):
        assert engine.token_budget == DEFAULT_TOKEN_BUDGET and engine.decoding_budget == 40
    default = make_engine(
        str(checkpoint),
        build_parser().parse_args(["serve", str(checkpoint), "--max-batch", "4", "--no-engine-process"]),
    )
    with shut_down_after(default):
        assert default.token_budget == DEFAULT_TOKEN_BUDGET


def test_serve_refuses_a_token_budget_within_the_batch(checkpoint, tmp_path):
    result = run_sliceserve(
        "serve", checkpoint, "--port", "0", "--max-batch", "8", "--max-num-batched-tokens", "8", cwd=tmp_path
    )
    assert result.returncode == 2
    assert_one_line_error(result, "--max-num-batched-tokens (8) must exceed --max-batch (8)")
    result = run_sliceserve(
        "serve", checkpoint, "--port", "0", "--max-batch", "8", "--max-tokens-while-decoding", "6", cwd=tmp_path
    )
    assert result.returncode == 2
    assert_one_line_error(result, "--max-tokens-while-decoding (6) must exceed --max-batch (8)")


def outputs(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Every request submitted at once; each one's generated ids."""
    results = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def listener(i):
        def on_event(event):
            results[i] += event.token_ids
            assert event.finish_reason in (None, "length"), event.error
            if event.finished:
                done.release()

        return on_event

    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.submit(prompt, p, listener(i))
    engine.start()
    for _ in prompts:
        assert done.acquire(timeout=120)
    return results


def workload(vocab: int):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(5, 40))] for _ in range(8)]
    greedy = [SamplingParams(max_tokens=rng.randint(20, 50), temperature=0.0, ignore_eos=True) for _ in range(4)]
    sampled = [
        SamplingParams(max_tokens=rng.randint(20, 50), temperature=0.9, top_p=0.9, seed=i, ignore_eos=True)
        for i in range(4)
    ]
    return prompts, greedy + sampled


def test_tight_cache_preempts_and_recomputes_to_the_same_outputs(served):
    model, tokenizer = served
    prompts, params = workload(model.spec.vocab_size)
    reserved = Engine(model, tokenizer, max_batch=8, max_model_len=128, prefill_chunk=8)
    # 12 blocks of 16: about two requests' worth, for eight requests of up to 90 tokens
    tight = Engine(model, tokenizer, max_batch=8, max_model_len=128, prefill_chunk=8, kv_blocks=13)
    with shut_down_after(reserved, tight):
        expected = outputs(reserved, prompts, params)
        got = outputs(tight, prompts, params)
        assert got == expected
        assert [len(ids) for ids in got] == [p.max_tokens for p in params]
        assert tight.stats.preemptions > 0 and reserved.stats.preemptions == 0
        assert tight.blocks.used == 0 and tight.blocks.available == 12  # every block came back
        assert tight.stats.kv_blocks_total == 12


def test_a_small_decoding_budget_serves_the_same_outputs_in_more_steps(served):
    """Prompts admitted a few tokens a step beside the decode rows: the same greedy and seeded
    outputs as with the whole budget, and no step carries more than the decoding budget while
    requests decode."""
    model, tokenizer = served
    prompts, params = workload(model.spec.vocab_size)
    whole = Engine(model, tokenizer, max_batch=8, max_model_len=128, prefill_chunk=64, kv_blocks=60)
    # the first step admits 64 prompt tokens (a few requests), the others come 12 - rows a step
    budgets = dict(token_budget=64, decoding_budget=12)
    small = Engine(model, tokenizer, max_batch=8, max_model_len=128, prefill_chunk=64, kv_blocks=60, **budgets)
    carried = []
    original = small.plan

    def watch():
        step = original()
        carried.append((len(step.decode) + len(step.folded), sum(end - start for _, start, end in step.prefill)))
        return step

    small.plan = watch
    with shut_down_after(whole, small):
        expected = outputs(whole, prompts, params)
        assert outputs(small, prompts, params) == expected
        assert all(decode + prompt <= 12 for decode, prompt in carried if decode)
        assert any(decode and prompt for decode, prompt in carried)  # prompts did ride along decode rows


def test_paged_cache_serves_more_requests_than_reserved_rows_would(served):
    """Eight requests of at most 90 tokens (6 blocks) at once in 50 blocks (800 positions),
    where eight reserved rows of 128 would take 1024."""
    model, tokenizer = served
    prompts, params = workload(model.spec.vocab_size)
    engine = Engine(model, tokenizer, max_batch=8, max_model_len=128, prefill_chunk=64, kv_blocks=50)
    peak = []
    original = engine.update_gauges

    def watch():
        original()
        peak.append(len(engine.running))

    engine.update_gauges = watch
    with shut_down_after(engine):
        outputs(engine, prompts, params)
        assert max(peak) == 8 and engine.stats.preemptions == 0
        assert engine.cache.bytes < model.new_cache(slots=8, max_len=128).bytes


def test_request_larger_than_the_cache_is_rejected(served):
    model, tokenizer = served
    engine = Engine(model, tokenizer, max_batch=2, max_model_len=128, kv_blocks=5)  # 4 blocks: 64 tokens
    with shut_down_after(engine):
        with pytest.raises(RequestRejected, match="needs more KV cache than the server holds \\(64 tokens\\)"):
            engine.submit([5] * 40, SamplingParams(max_tokens=30), lambda event: None)
        engine.submit([5] * 40, SamplingParams(max_tokens=24), lambda event: None)  # 64: fits


def test_prompt_logprobs_survive_preemption(served):
    model, tokenizer = served
    prompts, params = workload(model.spec.vocab_size)
    for p in params:
        p.prompt_logprobs = 2
    scored = {}

    def run(engine):
        results = [None] * len(prompts)
        done = threading.Semaphore(0)
        for i, (prompt, p) in enumerate(zip(prompts, params)):

            def on_event(event, i=i):
                if event.prompt_logprobs is not None:
                    results[i] = [None if t is None else (t.token_id, t.logprob) for t in event.prompt_logprobs]
                if event.finished:
                    done.release()

            engine.submit(prompt, p, on_event)
        engine.start()
        for _ in prompts:
            assert done.acquire(timeout=120)
        return results

    for name, blocks in (("reserved", None), ("tight", 13)):
        engine = Engine(model, tokenizer, max_batch=8, max_model_len=128, prefill_chunk=8, kv_blocks=blocks)
        with shut_down_after(engine):
            scored[name] = run(engine)
    assert scored["tight"] == scored["reserved"]
    assert all(len(s) == len(p) for s, p in zip(scored["tight"], prompts))
