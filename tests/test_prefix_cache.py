"""Prefix caching: requests whose prompts begin with the same full blocks share those blocks.

The pool's bookkeeping on its own (shared blocks counted, kept after release, forgotten least
recently released first), then the engine over a tiny sliced Llama (server_support): a
later request with a known prefix computes only its own tokens, and generates what it
generates without the cache.
"""

from __future__ import annotations

import random

import pytest
import torch
from server_support import build_checkpoint, shut_down_after

from sliceserve.engine.engine import Engine
from sliceserve.engine.kv_blocks import BlockPool
from sliceserve.engine.requests import SamplingParams
from sliceserve.model.kv_cache import KVCache
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.slicing.random_checkpoint import llama_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def pool(blocks: int) -> BlockPool:
    cache = KVCache(
        llama_spec("tiny", layers=1), slots=4, max_len=128, device="cpu", dtype=torch.float32, blocks=blocks
    )
    return BlockPool(cache, prefix_caching=True)


def test_pool_shares_keeps_and_forgets_blocks():
    blocks = pool(blocks=7)  # 6 usable
    prompt = list(range(40))  # two full blocks and 8 tokens
    assert blocks.grow(0, 41) and blocks.share_prefix(1, prompt) == 0  # nothing remembered yet
    blocks.remember(0, prompt, 40)
    assert blocks.share_prefix(1, prompt) == 32 and blocks.held[1] == blocks.held[0][:2]
    assert blocks.used == 3  # slot 0's three blocks, two of them shared by slot 1
    assert blocks.share_prefix(2, prompt[:32]) == 16  # never the block of a prompt's last token
    blocks.release(0)
    blocks.release(1)
    assert blocks.used == 1 and blocks.available == 5  # slot 2 still holds the first block
    blocks.release(2)
    assert blocks.used == 0 and len(blocks.evictable) == 2  # remembered, free to take
    assert blocks.share_prefix(3, prompt + [7]) == 32  # found again after its requests ended
    blocks.release(3)
    assert blocks.grow(0, 6 * 16)  # needs every block: the remembered ones are forgotten
    assert not blocks.by_hash and not blocks.evictable
    blocks.release(0)
    assert blocks.share_prefix(1, prompt) == 0


def test_different_prompts_of_equal_blocks_do_not_match():
    """A block's key covers every token before it: the same 16 tokens after another first block
    are another block."""
    blocks = pool(blocks=9)
    first, second = [1] * 16 + [2] * 16 + [3], [4] * 16 + [2] * 16 + [3]
    blocks.grow(0, len(first))
    blocks.remember(0, first, len(first))
    assert blocks.share_prefix(1, second) == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("prefix"))
    return load_model(path), load_tokenizer(path)


def generate(engine: Engine, prompt: list[int], **params) -> list[int]:
    events = list(engine.generate(prompt, SamplingParams(**params)))
    assert events[-1].finish_reason == "length", events[-1].error
    return [t for event in events for t in event.token_ids]


def test_engine_reuses_a_system_prompt(served):
    model, tokenizer = served
    rng = random.Random(0)
    system = [rng.randrange(3, model.spec.vocab_size) for _ in range(50)]  # three full blocks and 2 tokens
    questions = [[rng.randrange(3, model.spec.vocab_size) for _ in range(n)] for n in (6, 11, 3)]
    greedy = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = dict(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)
    cached = Engine(model, tokenizer, max_batch=4, max_model_len=128, prefill_chunk=8, kv_blocks=40)
    plain = Engine(
        model, tokenizer, max_batch=4, max_model_len=128, prefill_chunk=8, kv_blocks=40, prefix_caching=False
    )
    cached.start()
    plain.start()
    with shut_down_after(cached, plain):
        for question in questions:
            for params in (greedy, sampled):
                assert generate(cached, system + question, **params) == generate(plain, system + question, **params)
        # the first request computed the whole system prompt; each later one found its 48 tokens
        assert cached.stats.prefix_cache_hit_tokens == 48 * (2 * len(questions) - 1)
        assert plain.stats.prefix_cache_hit_tokens == 0
        scored = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)  # needs every position
        list(cached.generate(system + questions[0], scored))
        assert cached.stats.prefix_cache_hit_tokens == 48 * (2 * len(questions) - 1)
        assert cached.blocks.used == 0


def test_engine_under_memory_pressure_forgets_and_stays_right(served):
    """A cache of 12 blocks for prompts of up to 4: remembered blocks are taken back as needed,
    and every output equals the uncached engine's."""
    model, tokenizer = served
    rng = random.Random(1)
    prefixes = [[rng.randrange(3, model.spec.vocab_size) for _ in range(33)] for _ in range(3)]
    prompts = [prefixes[rng.randrange(3)] + [rng.randrange(3, 200) for _ in range(rng.randint(1, 9))] for _ in range(9)]
    params = dict(max_tokens=14, temperature=0.0, ignore_eos=True)
    cached = Engine(model, tokenizer, max_batch=3, max_model_len=128, prefill_chunk=16, kv_blocks=13)
    plain = Engine(
        model, tokenizer, max_batch=3, max_model_len=128, prefill_chunk=16, kv_blocks=13, prefix_caching=False
    )
    cached.start()
    plain.start()
    with shut_down_after(cached, plain):
        for prompt in prompts:
            assert generate(cached, prompt, **params) == generate(plain, prompt, **params)
        assert cached.stats.prefix_cache_hit_tokens > 0
        assert cached.blocks.used == 0 and cached.blocks.available == 12
