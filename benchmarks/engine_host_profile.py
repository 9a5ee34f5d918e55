"""The engine loop's own host work per decode row, on the CPU, with the model's time set apart.

At 64 streams a decode step of the fast path takes 5.6-8 ms on an H200 (7B shapes), and the
engine's host work for the step's rows must fit inside it or the GPU waits. This runs the
engine over a tiny random model (the reference runtime on the CPU: its forwards are timed and
subtracted) with a real tokenizer and a 32,000-token vocabulary, `--concurrency` asyncio
clients streaming `--requests` requests of `--prompt` + `--new` tokens (greedy, ignore_eos),
profiles the engine thread with cProfile, and prints the host microseconds per decode row
outside the model and the functions that take them.

    python benchmarks/engine_host_profile.py --tokenizer .tokenizer/smollm2 [--top 30]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_models import llama_spec, random_transformer  # noqa: E402

from sliceserve.engine.engine import Engine  # noqa: E402
from sliceserve.engine.requests import SamplingParams  # noqa: E402
from sliceserve.model.loader import load_tokenizer  # noqa: E402


async def clients(engine: Engine, concurrency: int, requests: int, prompt: int, new: int, vocab: int) -> int:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(requests)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    queue = list(prompts)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            ids = queue.pop()
            async for event in engine.stream(ids, params):
                tokens += len(event.token_ids)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--top", type=int, default=35)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = dataclasses.replace(llama_spec("tiny"), vocab_size=32000, max_positions=1024)
    model = random_transformer(spec, dtype=torch.float32, device="cpu")
    engine = Engine(model, load_tokenizer(args.tokenizer), max_batch=args.concurrency, kv_blocks=4096)

    model_seconds = 0.0
    for name in ("forward_cached", "prefill"):
        inner = getattr(model, name)

        def timed(*a, _inner=inner, **k):
            nonlocal model_seconds
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                model_seconds += time.perf_counter() - start

        setattr(model, name, timed)

    profile = cProfile.Profile()
    loop_body = engine.loop
    thread_seconds = 0.0

    def profiled_loop():
        nonlocal thread_seconds
        start = time.thread_time()
        profile.enable()
        try:
            loop_body()
        finally:
            profile.disable()
            thread_seconds = time.thread_time() - start

    engine.loop = profiled_loop
    engine.start()
    asyncio.run(clients(engine, 8, 8, args.prompt, 4, spec.vocab_size))  # warm-up (profiled too: small)
    model_seconds = 0.0
    profile.clear() if hasattr(profile, "clear") else None
    steps_before = engine.stats.generation_tokens
    start = time.perf_counter()
    tokens = asyncio.run(clients(engine, args.concurrency, args.requests, args.prompt, args.new, spec.vocab_size))
    wall = time.perf_counter() - start
    engine.shutdown()
    rows = engine.stats.generation_tokens - steps_before
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    print(
        f"{tokens} tokens in {wall:.2f} s; engine thread CPU {thread_seconds:.2f} s (warm-up included), "
        f"model forwards {model_seconds:.2f} s; outside the model: "
        f"{1e6 * (wall - model_seconds) / rows:.1f} us of wall per generated token"
    )


if __name__ == "__main__":
    main()
