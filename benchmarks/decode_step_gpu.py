"""Where served decoding loses to the model's own decode: attention through the block table,
and the engine's loop without HTTP.

On the GPU, Llama shapes with random weights:
  1. decode attention alone (one CUDA graph of 20 calls, replayed): the reserved cache against
     paged caches of 16/32/64 positions a block (random block order); batch x context as the
     serving scenarios;
  2. the engine alone (no HTTP, no second process): closed-loop clients at concurrency 1 and 64
     (prompt 256, 256 new tokens; and 64 of 32 + 64), greedy, ignore_eos, against the model's
     decode graph at the same batch, over the paged cache the server runs and the reserved one,
     each with a timeline of its forwards on the GPU's clock (StepTimeline: time in prefill,
     in decode, and between forwards); with --profile also torch.profiler's GPU busy shares.

    python benchmarks/decode_step_gpu.py --tokenizer DIR --out-dir $OUT [--sparsity 0.25]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import graph_ms, sync, versions, write_json  # noqa: E402
from random_models import llama_spec, random_transformer  # noqa: E402

from sliceserve.engine.engine import Engine  # noqa: E402
from sliceserve.engine.requests import SamplingParams  # noqa: E402
from sliceserve.fast.model import PREFILL_ROWS, FastTransformer  # noqa: E402
from sliceserve.fast.prefill_graphs import PrefillGraphs  # noqa: E402
from sliceserve.kernels.decode_attention import decode_attention  # noqa: E402
from sliceserve.model.kv_cache import PrefillChunk  # noqa: E402
from sliceserve.model.loader import load_tokenizer  # noqa: E402


def paged_layout(cache: torch.Tensor, block_size: int, order: torch.Tensor) -> torch.Tensor:
    """cache (slots, heads, max_len, dim) cut into blocks of `block_size` positions, block j of
    the cut stored at order[j]: (blocks, heads, block_size, dim)."""
    slots, heads, max_len, dim = cache.shape
    blocks = cache.reshape(slots, heads, max_len // block_size, block_size, dim).transpose(1, 2)
    paged = torch.empty_like(blocks.reshape(-1, heads, block_size, dim))
    paged[order] = blocks.reshape(-1, heads, block_size, dim)
    return paged


def attention_sweep(spec) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch, context in ((1, 384), (16, 384), (64, 384), (64, 1024)):
        max_len = 1024 + 64
        shape = (batch, spec.num_kv_heads, max_len, spec.head_dim)
        keys = torch.randn(shape, generator=g).to("cuda", torch.float16)
        values = torch.randn(shape, generator=g).to("cuda", torch.float16)
        q = torch.randn(batch, spec.num_heads, spec.head_dim, generator=g).to("cuda", torch.float16)
        positions = torch.full((batch,), context - 1, device="cuda")
        slots = torch.arange(batch, device="cuda")
        row = {"batch": batch, "context": context}
        want = decode_attention(q, keys, values, positions, slots)
        row["reserved_us"] = 1e3 * graph_ms(lambda: decode_attention(q, keys, values, positions, slots), inner=20)
        for block_size in (16, 32, 64):
            order = torch.randperm(batch * max_len // block_size, generator=g).to("cuda")
            pk, pv = paged_layout(keys, block_size, order), paged_layout(values, block_size, order)
            table = order.reshape(batch, -1).to(torch.int32)
            run = lambda: decode_attention(q, pk, pv, positions, slots, block_table=table)  # noqa: E731
            row[f"paged{block_size}_equal"] = bool(torch.equal(run(), want))
            row[f"paged{block_size}_us"] = 1e3 * graph_ms(run, inner=20)
        print(row, flush=True)
        rows.append(row)
    return rows


def model_decode_tok_s(model, cache, batch: int, context: int, steps: int = 64) -> float:
    vocab = model.spec.vocab_size
    prompts = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0))
    slots_list = list(range(batch))
    if cache.paged:
        per = cache.blocks_per_slot
        cache.assign_blocks([(s, i, 1 + s * per + i) for s in slots_list for i in range(per)])
    logits = model.prefill([PrefillChunk(p.tolist(), 0, s) for s, p in zip(slots_list, prompts)], cache)
    tokens = logits.argmax(-1)
    slots = torch.arange(batch, device="cuda")
    position = torch.full((batch,), context, device="cuda")
    graphs = model.decode_graphs(cache)
    tokens = graphs.run(tokens, position, slots).argmax(-1)
    sync()
    start = time.perf_counter()
    for step in range(1, steps):
        tokens = graphs.run(tokens, position + step, slots).argmax(-1)
    sync()
    seconds = time.perf_counter() - start
    model.graphs = None
    return batch * (steps - 1) / seconds


def closed_loop(engine: Engine, concurrency: int, per_client: int, prompt_len: int, new: int, vocab: int) -> dict:
    """Clients each sending `per_client` requests one after another; output tok/s over the wall."""
    g = torch.Generator().manual_seed(1000 * concurrency + prompt_len)  # no scenario's prompts cached by another's
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(concurrency * per_client)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    counts, gaps = [0] * concurrency, []

    def client(i: int) -> None:
        for prompt in prompts[i * per_client : (i + 1) * per_client]:
            last = None
            for event in engine.generate(prompt, params):
                counts[i] += len(event.token_ids)
                now = time.perf_counter()
                if last is not None and event.token_ids:
                    gaps.append(now - last)
                last = now

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    gaps.sort()
    return {
        "concurrency": concurrency,
        "requests": concurrency * per_client,
        "tok_s": sum(counts) / seconds,
        "itl_p50_ms": 1e3 * gaps[len(gaps) // 2] if gaps else None,
    }


def gpu_busy(run) -> dict:
    """The GPU's busy share while `run()` runs (kernel intervals merged), and profiler tables."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        sync()
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
    )
    if not spans:
        return {"kernels": 0}
    busy, (lo, hi) = 0.0, spans[0]
    first, last = spans[0][0], max(end for _, end in spans)
    for start, end in spans[1:]:
        if start > hi:
            busy += hi - lo
            lo, hi = start, end
        else:
            hi = max(hi, end)
    busy += hi - lo
    return {
        "kernels": len(spans),
        "window_us": last - first,
        "busy_us": busy,
        "busy_share": busy / (last - first),
        "gpu_table": prof.key_averages().table(sort_by="cuda_time_total", row_limit=15),
        "host_table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
    }


def decoding_window(engine: Engine, vocab: int):
    """100 decode steps of one request, past its prefill."""
    prompt = torch.randint(0, vocab, (256,), generator=torch.Generator().manual_seed(2)).tolist()
    events = engine.generate(prompt, SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True))
    for _ in range(50):
        next(events)

    def run():
        for _ in range(100):
            next(events)

    return run, events


class StepTimeline:
    """Each prefill and decode forward the engine queues: its kind and rows, the host's clock,
    and CUDA events around what it queued. On the GPU's clock, a call's span (first to last
    event) is its forward; the gap to the next call's first event is what ran between them
    (sampling, uploads) plus the time the GPU sat idle waiting for the host."""

    def __init__(self, engine: Engine):
        self.rows: list[tuple[str, int, float, torch.cuda.Event, torch.cuda.Event]] = []
        self.host_ms: list[float] = []  # each call's time on the host, to queue its forward
        prefill, decode = engine.prefill, engine.decode

        def timed(kind: str, size: int, call):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            host = time.perf_counter()
            start.record()
            result = call()
            end.record()
            self.rows.append((kind, size, host, start, end))
            self.host_ms.append(1e3 * (time.perf_counter() - host))
            return result

        def logged_prefill(plan):
            size = sum(e - s for _, s, e in plan.prefill) + len(plan.folded)
            return timed("prefill", size, lambda: prefill(plan))

        def logged_decode(requests, sampled=None):
            kind = "decode_ahead" if sampled is not None else "decode"
            return timed(kind, len(requests), lambda: decode(requests, sampled))

        engine.prefill, engine.decode = logged_prefill, logged_decode
        self.restore = lambda: setattr(engine, "prefill", prefill) or setattr(engine, "decode", decode)

    def summary(self) -> dict:
        """Per kind: calls, rows, GPU ms of the forwards, GPU ms of the gaps after them; and the
        whole window on the GPU's clock."""
        sync()
        kinds: dict[str, dict] = {}
        prefills = []
        for (kind, size, _, start, end), after, host in zip(self.rows, self.rows[1:] + [None], self.host_ms):
            entry = kinds.setdefault(
                kind, {"calls": 0, "rows": 0, "forward_ms": 0.0, "host_ms": 0.0, "gap_after_ms": 0.0}
            )
            entry["calls"] += 1
            entry["rows"] += size
            entry["forward_ms"] += start.elapsed_time(end)
            entry["host_ms"] += host
            if kind == "prefill" and len(prefills) < 64:
                prefills.append([size, round(start.elapsed_time(end), 2), round(host, 2)])
            if after is not None:
                entry["gap_after_ms"] += end.elapsed_time(after[3])
        for entry in kinds.values():
            entry["forward_ms_per_call"] = entry["forward_ms"] / entry["calls"]
        window = self.rows[0][3].elapsed_time(self.rows[-1][4]) if self.rows else 0.0
        big_gaps = sorted(
            (end.elapsed_time(after[3]), kind, after[0])
            for (kind, _, _, _, end), after in zip(self.rows, self.rows[1:])
        )[-8:]
        return {
            "window_ms": window,
            "kinds": kinds,
            "largest_gaps_ms": [[round(g, 2), a, b] for g, a, b in big_gaps],
            "prefills_rows_gpu_ms_host_ms": prefills,
        }


def timed_prefill(model, chunks: list[PrefillChunk], cache) -> tuple[torch.Tensor, dict]:
    """The logits of a prefill of `chunks`, and the median over 5 of the host's time to queue
    it and of its wall time."""
    logits = model.prefill(chunks, cache)
    sync()
    host, wall = [], []
    for _ in range(5):
        start = time.perf_counter()
        model.prefill(chunks, cache)
        host.append(time.perf_counter() - start)
        sync()
        wall.append(time.perf_counter() - start)
    return logits, {"host_ms": 1e3 * sorted(host)[2], "wall_ms": 1e3 * sorted(wall)[2]}


def prefill_host_ms(model, cache, vocab: int) -> dict:
    """A step of 8 fresh prompts of 256 tokens: the host's time to queue it, and its wall time."""
    g = torch.Generator().manual_seed(3)
    chunks = [PrefillChunk(torch.randint(0, vocab, (256,), generator=g).tolist(), 0, s) for s in range(8)]
    return timed_prefill(model, chunks, cache)[1]


def profile_windows(engine: Engine, vocab: int, out_dir: Path, result: dict) -> None:
    """torch.profiler's GPU busy share of 100 decode steps at concurrency 1 and of one wave at 64
    (the profiler slows the host: a diagnosis of where kernels run, not a speed)."""
    run, rest = decoding_window(engine, vocab)
    share = gpu_busy(run)
    for _ in rest:
        pass
    (out_dir / "decode_step_c1_profile.txt").write_text(share.pop("gpu_table") + "\n\n" + share.pop("host_table"))
    result["c1_gpu_busy"] = share
    share = gpu_busy(lambda: closed_loop(engine, 64, 1, 256, 256, vocab))
    (out_dir / "decode_step_c64_profile.txt").write_text(share.pop("gpu_table") + "\n\n" + share.pop("host_table"))
    result["c64_one_wave_gpu_busy"] = share


def prefill_graph_check(model, cache, vocab: int) -> list[dict]:
    """Small prefills eager against their CUDA graphs (fast/prefill_graphs.py): host and wall ms
    of each, and the logits' agreement (relative error, same argmax); raises where they differ."""
    graphs = PrefillGraphs(model, cache, PREFILL_ROWS)
    g = torch.Generator().manual_seed(4)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    cases = {
        "1 x 32": [PrefillChunk(ids(32), 0, 0)],
        "1 x 256": [PrefillChunk(ids(256), 0, 0)],
        "32 + 7 decode rows": [PrefillChunk(ids(32), 0, 0)] + [PrefillChunk(ids(1), 100, s) for s in range(1, 8)],
        "4 x 100": [PrefillChunk(ids(100), 0, s) for s in range(4)],
    }
    rows = []
    for name, chunks in cases.items():
        row = {"case": name, "tokens": sum(len(c.tokens) for c in chunks)}
        for kind, using in (("eager", None), ("graph", graphs)):
            model.prefill_graphs = using
            logits, times = timed_prefill(model, chunks, cache)
            row[f"{kind}_host_ms"], row[f"{kind}_wall_ms"] = times["host_ms"], times["wall_ms"]
            row[kind] = logits.float()
        eager, graph = row.pop("eager"), row.pop("graph")
        row["relative_error"] = ((graph - eager).norm() / eager.norm()).item()
        row["same_argmax"] = bool((graph.argmax(-1) == eager.argmax(-1)).all())
        print(row, flush=True)
        if row["relative_error"] > 1e-2 or not row["same_argmax"]:
            raise RuntimeError(f"prefill graph differs from the eager prefill: {row}")
        rows.append(row)
    model.prefill_graphs = None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-2-7b")
    parser.add_argument("--sparsity", type=float, default=0.0)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also torch.profiler's GPU busy shares")
    parser.add_argument("--token-budget", type=int, help="the engine's tokens a step (default: its own)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    spec = llama_spec(args.shape, args.sparsity)
    result = {
        "shape": args.shape,
        "sparsity": args.sparsity,
        "dtype": "float16",
        "device": torch.cuda.get_device_name(),
    }
    result["versions"] = versions()
    if not args.skip_attention:
        result["attention"] = attention_sweep(spec)
        write_json(args.out_dir / "decode_step.json", result)
    model = FastTransformer(random_transformer(spec, dtype=torch.float16), products="auto")
    levels = {}
    # (name, concurrency, prompt, new tokens, requests per client): serve_gpu.py's scenarios
    scenarios = [("c1", 1, 256, 256, 4), ("c64", 64, 256, 256, 2), ("c64-short", 64, 32, 64, 4)]
    for name, batch, prompt_len, new_tokens, _ in scenarios:
        context = prompt_len + new_tokens // 2
        reserved = model.new_cache(slots=batch, max_len=context + 80)
        paged = model.new_cache(slots=batch, max_len=context + 80, blocks=batch * -(-(context + 80) // 16) + 1)
        levels[name] = {
            "reserved": model_decode_tok_s(model, reserved, batch, context),
            "paged": model_decode_tok_s(model, paged, batch, context),
        }
        del reserved, paged
        print(name, levels[name], flush=True)
    result["model_level_tok_s"] = levels
    cache = model.new_cache(slots=8, max_len=300, blocks=8 * 19 + 1)
    cache.assign_blocks([(s, i, 1 + s * 19 + i) for s in range(8) for i in range(19)])
    result["prefill_8x256"] = prefill_host_ms(model, cache, spec.vocab_size)
    print("prefill", result["prefill_8x256"], flush=True)
    result["prefill_graphs"] = prefill_graph_check(model, cache, spec.vocab_size)
    write_json(args.out_dir / "decode_step.json", result)
    del cache
    torch.cuda.empty_cache()
    tokenizer = load_tokenizer(args.tokenizer)
    vocab = spec.vocab_size
    result["engine_alone"] = []
    # the paged cache the server runs, and the reserved one (what the paging costs the loop)
    for cache_kind, blocks in (("paged", 64 * 33 + 64), ("reserved", None)):
        engine = Engine(
            model, tokenizer, max_batch=64, max_model_len=520, kv_blocks=blocks, token_budget=args.token_budget
        )
        engine.start()
        try:
            closed_loop(engine, 8, 1, 256, 16, vocab)  # warm-up
            for name, concurrency, prompt_len, new_tokens, per_client in scenarios:
                if cache_kind == "reserved" and concurrency == 1:
                    continue
                timeline = StepTimeline(engine)
                row = {
                    "cache": cache_kind,
                    "scenario": name,
                    **closed_loop(engine, concurrency, per_client, prompt_len, new_tokens, vocab),
                }
                row["timeline"] = timeline.summary()
                timeline.restore()
                row["over_model_reserved"] = row["tok_s"] / levels[name]["reserved"]
                row["over_model_paged"] = row["tok_s"] / levels[name]["paged"]
                print(row, flush=True)
                result["engine_alone"].append(row)
                write_json(args.out_dir / "decode_step.json", result)
            if args.profile and cache_kind == "paged":
                profile_windows(engine, vocab, args.out_dir, result)
        finally:
            engine.shutdown()
        del engine
        torch.cuda.empty_cache()
    write_json(args.out_dir / "decode_step.json", result)


if __name__ == "__main__":
    main()
