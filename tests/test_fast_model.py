"""The fast path (Triton kernels) computes the same model as the reference runtime.

Every family variant, dense export and 25% slice, float32 checkpoints: whole-sequence
logits, and a cached prefill followed by decode steps of rows at different lengths (as
the engine runs them). Without a GPU the kernels run in Triton's interpreter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_support import DEVICE, ON_GPU, relative_error  # sets TRITON_INTERPRET first
from tiny_models import random_tokens, save_tiny_model, write_tiny_checkpoint

from sliceserve.fast.model import FastTransformer
from sliceserve.model.kv_cache import PrefillChunk
from sliceserve.model.loader import load_model

# One variant per code path: gated MLP with every bias and GQA, sliding window, attention-only
# biases, learned positions with ReLU, parallel block with partial rotary. (llama and llama3
# differ from these only in rope tables, which the reference computes the same way.)
FAST_PATH_VARIANTS = ("llama-biases", "mistral", "qwen2", "opt", "phi")


@pytest.fixture(scope="module", params=FAST_PATH_VARIANTS)
def variant_folder(request, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp(f"fast-{request.param}")
    save_tiny_model(request.param, work / "hf")
    return work


@pytest.fixture(scope="module", params=["dense", "sliced"])
def checkpoint(request, variant_folder) -> Path:
    return write_tiny_checkpoint(variant_folder / "hf", request.param, variant_folder / request.param, torch.float32)


@pytest.fixture(scope="module")
def models(checkpoint):
    reference = load_model(checkpoint, device=DEVICE)
    return reference, FastTransformer(reference, products="triton")


@torch.no_grad()
def test_whole_sequence_logits_match_the_reference(models):
    reference, fast = models
    tokens = random_tokens(2, 19, seed=5).to(DEVICE)
    assert relative_error(fast(tokens), reference(tokens)) < 1e-5


@torch.no_grad()
def test_library_products_compute_the_same_model(models):
    """The cuBLAS variant of the fast path (same layer code, library products)."""
    reference, _ = models
    tokens = random_tokens(2, 19, seed=6).to(DEVICE)
    assert relative_error(FastTransformer(reference, products="library")(tokens), reference(tokens)) < 1e-5


@torch.no_grad()
def test_auto_products_switch_backends_by_rows_within_one_request(models):
    """ "auto" (the default): a 24-token prefill runs on library products, while its last row's
    head and the decode step run on our kernels, reading norms the library's layers left."""
    reference, _ = models
    fast = FastTransformer(reference)
    prompt = random_tokens(1, 24, seed=3).to(DEVICE)
    slot = torch.tensor([1], device=DEVICE)
    results = []
    for model in (reference, fast):
        cache = model.new_cache(slots=2, max_len=32)
        first = model.forward_cached(prompt, torch.arange(24, device=DEVICE)[None], slot, cache, last_only=True)
        step = model.forward_cached(prompt[:, :1], torch.tensor([[24]], device=DEVICE), slot, cache)
        results.append((first, step))
    for actual, expected in zip(results[1], results[0]):
        assert relative_error(actual, expected) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("products", ["triton", "library"])
def test_prefill_then_decode_rows_of_different_lengths(models, products):
    reference, fast = models
    if products == "library":
        fast = FastTransformer(reference, products="library")
    prompts = [random_tokens(1, n, seed=n)[0].to(DEVICE) for n in (13, 5, 9)]
    steps = 2
    caches = {name: model.new_cache(slots=4, max_len=32) for name, model in (("ref", reference), ("fast", fast))}
    slots = [2, 0, 3]
    for name, model in (("ref", reference), ("fast", fast)):
        for slot, prompt in zip(slots, prompts):  # two chunks: the second attends to the cached first
            half = len(prompt) // 2
            for chunk, start in ((prompt[:half], 0), (prompt[half:], half)):
                positions = torch.arange(start, start + len(chunk), device=DEVICE)[None]
                model.forward_cached(
                    chunk[None], positions, torch.tensor([slot], device=DEVICE), caches[name], last_only=True
                )
    generator = torch.Generator().manual_seed(7)
    lengths = [len(p) for p in prompts]
    for _ in range(steps):
        tokens = torch.randint(0, reference.spec.vocab_size, (3, 1), generator=generator).to(DEVICE)
        positions = torch.tensor(lengths, device=DEVICE)[:, None]
        slot_ids = torch.tensor(slots, device=DEVICE)
        expected = reference.forward_cached(tokens, positions, slot_ids, caches["ref"])
        actual = fast.forward_cached(tokens, positions, slot_ids, caches["fast"])
        assert relative_error(actual, expected) < 1e-5
        lengths = [n + 1 for n in lengths]


@torch.no_grad()
def test_a_batched_prefill_equals_each_chunk_alone(models):
    """Several requests' chunks in one prefill forward (fresh prompts attend together through a
    block-diagonal mask, a continued one over its cached prefix) give the reference's logits and
    cache, then the next decode step agrees too."""
    reference, fast = models
    prompts = [random_tokens(1, n, seed=20 + n)[0].tolist() for n in (7, 11, 4, 9)]
    slots = [1, 3, 0, 2]
    caches = {name: model.new_cache(slots=4, max_len=32) for name, model in (("ref", reference), ("fast", fast))}
    first = [PrefillChunk(prompts[0][:3], 0, slots[0])]  # request 0 is part-way through its prompt
    reference.prefill(first, caches["ref"])
    fast.prefill(first, caches["fast"])
    batch = [PrefillChunk(prompts[0][3:], 3, slots[0])] + [
        PrefillChunk(p, 0, s) for p, s in zip(prompts[1:], slots[1:])
    ]
    expected, actual = reference.prefill(batch, caches["ref"]), fast.prefill(batch, caches["fast"])
    assert actual.shape == expected.shape == (4, reference.spec.vocab_size)
    assert relative_error(actual, expected) < 1e-5
    tokens = expected.argmax(-1)[:, None]
    positions = torch.tensor([len(p) for p in prompts], device=DEVICE)[:, None]
    slot_ids = torch.tensor(slots, device=DEVICE)
    after = reference.forward_cached(tokens, positions, slot_ids, caches["ref"])
    assert relative_error(fast.forward_cached(tokens, positions, slot_ids, caches["fast"]), after) < 1e-5


@pytest.mark.parametrize("variant_folder", ["llama-biases"], indirect=True)
@torch.no_grad()
def test_a_prefill_returns_every_position_of_the_chunks_that_ask(models):
    """Prompt scoring: a chunk with all_positions gives the logits of each of its positions, in
    chunk order beside the others' last rows, on both paths; they equal whole-sequence logits."""
    reference, fast = models
    prompts = [random_tokens(1, n, seed=40 + n)[0].tolist() for n in (9, 6, 5)]
    for model in (reference, fast):
        cache = model.new_cache(slots=3, max_len=16)
        model.prefill([PrefillChunk(prompts[0][:4], 0, 0, all_positions=True)], cache)
        batch = [
            PrefillChunk(prompts[0][4:], 4, 0, all_positions=True),
            PrefillChunk(prompts[1], 0, 1),
            PrefillChunk(prompts[2], 0, 2, all_positions=True),
        ]
        logits = model.prefill(batch, cache)
        assert logits.shape == (5 + 1 + 5, reference.spec.vocab_size)
        whole = [reference(torch.tensor([p], device=DEVICE))[0] for p in prompts]
        assert relative_error(logits[:5], whole[0][4:]) < 1e-5
        assert relative_error(logits[5], whole[1][-1]) < 1e-5
        assert relative_error(logits[6:], whole[2]) < 1e-5


class NumberTokenizer:
    """Token ids written as numbers: all the engine needs from a tokenizer here."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.parametrize("variant_folder", ["opt"], indirect=True)  # one variant suffices: the engine
@pytest.mark.parametrize("checkpoint", ["sliced"], indirect=True)  # is the same for every model
def test_engine_on_the_fast_path_generates_the_reference_tokens(checkpoint, models):
    """Greedy tokens through the engine (chunked prefill, two requests decoded together)
    are the same on both paths."""
    import queue

    from sliceserve.engine.engine import Engine
    from sliceserve.engine.requests import SamplingParams

    outputs = {}
    for name, model in zip(("reference", "fast"), models):
        engine = Engine(model, NumberTokenizer(), max_batch=2, prefill_chunk=4)
        events = {n: queue.Queue() for n in (6, 9)}
        for n, q in events.items():  # both queued before the engine starts: they run together
            engine.submit(
                random_tokens(1, n, seed=n)[0].tolist(),
                SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                q.put,
            )
        engine.start()
        try:
            outputs[name] = {}
            for n, q in events.items():
                tokens, event = [], None
                while event is None or not event.finished:
                    event = q.get(timeout=600)
                    tokens += event.token_ids
                assert event.finish_reason == "length"
                outputs[name][n] = tokens
        finally:
            engine.shutdown()
    assert outputs["fast"] == outputs["reference"]
    assert all(len(tokens) == 3 for tokens in outputs["fast"].values())


@pytest.mark.skipif(ON_GPU, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("variant_folder", ["llama-biases"], indirect=True)
@pytest.mark.parametrize("checkpoint", ["dense"], indirect=True)
def test_fast_runtime_on_a_cpu_is_a_clear_error(checkpoint, capsys):
    from sliceserve.cli import main

    assert main(["generate", str(checkpoint), "hi", "--runtime", "fast"]) == 2
    assert "the fast runtime needs a CUDA device" in capsys.readouterr().err
