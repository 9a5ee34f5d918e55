"""Served speed against model speed, dense and sliced, in one run on one GPU.

For each variant (random weights of a real shape, written by `sliceserve export random:SHAPE`):
  1. model level: the fast path's CUDA-graph decode step alone (the graph the engine replays),
     `batch` rows at the scenario's context, greedy argmax fed back on the GPU: tok/s;
  2. served: `sliceserve serve` in its own process, loaded by benchmarks/serve_bench.py over
     HTTP (streaming, greedy, ignore_eos), at each scenario's concurrency, with the GPU's
     utilisation sampled through NVML while it runs.
The report gives served / model-level per scenario and sliced / dense served, against the
serving issue's targets.

    python benchmarks/serve_gpu.py --tokenizer .tokenizer/smollm2 --out-dir $OUT
    python benchmarks/serve_gpu.py --quick --tokenizer DIR --out-dir /tmp/x     # CPU smoke run (tiny shape)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import sync, write_json  # noqa: E402
from serve_bench import BenchConfig, run_benchmark  # noqa: E402


@dataclass
class Scenario:
    name: str
    concurrency: int
    input_len: int
    output_len: int
    num_prompts: int
    target: float | None  # served / model-level wanted


FIT = "fit"  # concurrency 0: as many requests of input + output tokens as the server's KV cache holds
# 8 requests a stream (runs 1-16: 2-6): closed-loop clients of equal lengths arrive in waves, and
# the model level they are divided by is a steady state, which the first and last waves are not
SCENARIOS = [
    Scenario("c64", 64, 256, 256, 512, 0.85),
    Scenario("c16", 16, 256, 256, 128, 0.9),
    Scenario("c1", 1, 256, 256, 8, 0.95),
    Scenario("c64-short", 64, 32, 64, 512, 0.7),
    Scenario(FIT, 0, 512, 512, 0, None),
]
QUICK = [Scenario("c4", 4, 16, 8, 12, None), Scenario("c1", 1, 16, 8, 3, None), Scenario(FIT, 0, 16, 8, 0, None)]


def export(shape: str, sparsity: float, tokenizer: str, out: Path, device: str) -> Path:
    if not (out / "config.json").exists():
        command = [
            sys.executable,
            "-m",
            "sliceserve",
            "export",
            f"random:{shape}",
            "--tokenizer",
            tokenizer,
            "--sparsity",
            str(sparsity),
            "--device",
            device,
            "--out",
            str(out),
        ]
        subprocess.run(command, check=True)
    return out


@torch.inference_mode()
def model_decode_tok_s(model, device: str, batch: int, context: int, steps: int) -> float:
    """Decode tok/s of the fast path alone: `steps` graph replays of `batch` rows whose prompts
    of `context` tokens were prefilled, each step's argmax the next step's input."""
    from sliceserve.model.kv_cache import PrefillChunk

    cache = model.new_cache(slots=batch, max_len=context + steps + 4)
    vocab = model.spec.vocab_size
    prompts = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0))
    logits = model.prefill([PrefillChunk(p.tolist(), 0, slot) for slot, p in enumerate(prompts)], cache)
    tokens = logits.argmax(-1)
    slots = torch.arange(batch, device=device)
    position = torch.full((batch,), context, device=device)
    if device.startswith("cuda"):
        graphs = model.decode_graphs(cache)
        run = lambda t, p: graphs.run(t, p, slots)
    else:
        run = lambda t, p: model.forward_cached(t[:, None], p[:, None], slots, cache)[:, 0]
    tokens = run(tokens, position).argmax(-1)  # warm-up (captures the graph)
    sync(device)
    start = time.perf_counter()
    for step in range(1, steps):
        tokens = run(tokens, position + step).argmax(-1)
    sync(device)
    seconds = time.perf_counter() - start
    model.graphs = None  # the graphs pin this cache
    return batch * (steps - 1) / seconds


class Utilisation:
    """GPU utilisation (NVML's percent of time a kernel ran) sampled every 100 ms."""

    def __init__(self):
        self.samples: list[int] = []
        self.handle, self.stop = None, threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # no NVML (a CPU run): no samples
            pass

    def __enter__(self):
        if self.handle is not None:
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.wait(0.1):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc):
        self.stop.set()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return {
            "mean": round(sum(ordered) / len(ordered), 1),
            "p10": ordered[len(ordered) // 10],
            "samples": len(ordered),
        }


def cache_fit(port: int, tokens: int) -> int:
    """How many requests of `tokens` tokens the server's paged KV cache holds at once (its
    /metrics block count, less the 1% it keeps free when admitting)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    blocks = next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("sliceserve_kv_cache_blocks_total")
    )
    return int(blocks * 0.99) // -(-tokens // 16)


def engine_ttft_totals(port: int) -> tuple[float, int]:
    """(seconds, requests) so far in the engine's time-to-first-token histogram (/metrics): from a
    request's arrival at the engine, where the client's TTFT adds HTTP, the server's handling and
    the pipe to the engine's process."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {
        line.split()[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(
            ("sliceserve_time_to_first_token_seconds_sum", "sliceserve_time_to_first_token_seconds_count")
        )
    }
    return values["sliceserve_time_to_first_token_seconds_sum"], int(
        values["sliceserve_time_to_first_token_seconds_count"]
    )


def start_server(
    checkpoint: Path, device: str, port: int, max_batch: int, max_model_len: int, log: Path, flags: str = ""
):
    command = [
        sys.executable,
        "-m",
        "sliceserve",
        "serve",
        str(checkpoint),
        "--device",
        device,
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-model-len",
        str(max_model_len),
        "--max-queue",
        "4096",
        *flags.split(),
    ]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise RuntimeError("the server did not come up in 10 minutes")


def run_variant(name: str, checkpoint: Path, args, scenarios: list[Scenario], out_dir: Path, done) -> None:
    """One result per server flag set (--sweep-flags, else --server-flags), all divided by the
    same model level, measured once; `done(result)` after each, so a run cut short keeps what it measured."""
    from sliceserve.fast.model import FastTransformer
    from sliceserve.model.loader import load_model

    model = FastTransformer(load_model(checkpoint, device=args.device))
    levels = {s.name: model_level(model, args, s) for s in scenarios if s.name != FIT}  # FIT: once it is sized
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    swept = args.sweep_flags.split(";") if args.sweep_flags is not None else [""]
    flag_sets = [f"{args.server_flags} {flags}".strip() for flags in swept]  # --server-flags go to each
    for index, flags in enumerate(flag_sets):
        label = name if args.sweep_flags is None else f"{name} [{flags or 'defaults'}]"
        result = {"variant": label, "checkpoint": str(checkpoint), "server_flags": flags, "scenarios": []}
        for s in scenarios:
            result["scenarios"].append(
                {"name": s.name, **({"model_tok_s": levels[s.name]} if s.name in levels else {})}
            )
        serve_scenarios(result, checkpoint, args, scenarios, out_dir / f"server_{name}_{index}.log")
        done(result)


def serve_scenarios(result: dict, checkpoint: Path, args, scenarios: list[Scenario], log: Path) -> None:
    """Each scenario through `sliceserve serve` with the result's flags, into its rows."""
    from sliceserve.fast.model import FastTransformer
    from sliceserve.model.loader import load_model

    name = result["variant"]
    vocab = json.loads((checkpoint / "config.json").read_text())["model"]["vocab_size"]
    max_len = max(s.input_len + s.output_len for s in scenarios) + 8
    server = start_server(checkpoint, args.device, args.port, args.max_batch, max_len, log, result["server_flags"])
    try:
        for s, row in zip(scenarios, result["scenarios"]):
            if s.name == FIT:
                fit = min(args.max_batch, cache_fit(args.port, s.input_len + s.output_len))
                s = Scenario(FIT, fit, s.input_len, s.output_len, (args.requests_per_stream or 2) * fit, None)
                row["concurrency"] = fit
            config = BenchConfig(
                base_url=f"http://127.0.0.1:{args.port}/v1",
                num_prompts=s.num_prompts,
                input_len=s.input_len,
                output_len=s.output_len,
                concurrency=s.concurrency,
                warmup=min(s.concurrency, 8),
                label=f"{name}-{s.name}",
                seed=1,
                vocab_size=vocab,
            )
            before = engine_ttft_totals(args.port)
            with Utilisation() as utilisation:
                served = asyncio.run(run_benchmark(config))
            after = engine_ttft_totals(args.port)
            row["served"] = {k: served[k] for k in ("metrics",) if k in served} or served
            # the engine's own mean TTFT over the same requests (its warm-up ones included)
            row["engine_ttft_ms_mean"] = 1e3 * (after[0] - before[0]) / max(1, after[1] - before[1])
            row["gpu_utilisation"] = utilisation.summary()
            row["served_tok_s"] = served["metrics"]["output_throughput"]
            row["target"] = s.target
            print(
                f"{name} {s.name} (c={s.concurrency}): served {row['served_tok_s']:,.0f} tok/s, "
                f"TTFT p99 {served['metrics']['ttft_ms']['p99']:.0f} ms (mean {served['metrics']['ttft_ms']['mean']:.0f}, "
                f"the engine's own {row['engine_ttft_ms_mean']:.0f}), errors {served['metrics']['errors']}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
    for s, row in zip(scenarios, result["scenarios"]):
        if s.name == FIT and "concurrency" in row:
            model = FastTransformer(load_model(checkpoint, device=args.device))
            row["model_tok_s"] = model_level(
                model, args, Scenario(FIT, row["concurrency"], s.input_len, s.output_len, 0, None)
            )
            del model
        if "served_tok_s" in row:
            row["served_over_model"] = row["served_tok_s"] / row["model_tok_s"]


def model_level(model, args, s: Scenario) -> float:
    tok_s = model_decode_tok_s(
        model, args.device, s.concurrency, s.input_len + s.output_len // 2, min(s.output_len, 128)
    )
    print(f"{s.name} (batch {s.concurrency}): model-level decode {tok_s:,.0f} tok/s", flush=True)
    return tok_s


def markdown(result: dict) -> str:
    c = result["conditions"]
    lines = [
        f"# Served vs model-level decode, {c['shape']} shapes (random weights)",
        "",
        f"{c['device']}, {c['dtype']}, torch {c['torch']}, Python {c['python']}, {c['date']}. "
        f"Server: `sliceserve serve --max-batch {c['max_batch']}{(' ' + c['server_flags']) if c.get('server_flags') else ''}`, streaming, greedy, ignore_eos, "
        "benchmarks/serve_bench.py on the same machine. Model level: the same CUDA-graph decode step alone, "
        "batch = concurrency, context = prompt + half the output.",
        "",
        "| variant | scenario | in / out | model tok/s | served tok/s | served / model (target) | TTFT p50 / p99 ms | "
        "TPOT p50 ms | GPU util mean | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    scenarios = {s["name"]: s for s in c["scenarios"]}
    for v in result["variants"]:
        for row in v["scenarios"]:
            s, m = scenarios[row["name"]], row["served"]["metrics"]
            target = row.get("target")
            verdict = (
                "" if target is None else f" ({target:g}: {'met' if row['served_over_model'] >= target else 'missed'})"
            )
            util = row.get("gpu_utilisation") or {}
            lines.append(
                f"| {v['variant']} | {row['name']} (c={row.get('concurrency', s['concurrency'])}, {m['completed']} requests) | "
                f"{s['input_len']} / {s['output_len']} | "
                f"{row['model_tok_s']:,.0f} | {row['served_tok_s']:,.0f} | {row['served_over_model']:.2f}{verdict} | "
                f"{m['ttft_ms']['p50']:.0f} / {m['ttft_ms']['p99']:.0f} | {m['tpot_ms']['p50']:.1f} | "
                f"{util.get('mean', '-')} | {m['errors'] or 'none'} |"
            )
    dense = [v for v in result["variants"] if v["variant"].startswith("dense")]
    sliced = [v for v in result["variants"] if v["variant"].startswith("sliced")]
    for d, sl in zip(dense, sliced) if len(dense) == len(sliced) else ():  # flag set by flag set
        lines += [
            "",
            f"{sl['variant']} / {d['variant']}, served tok/s: "
            + ", ".join(
                f"{a['name']} {b['served_tok_s'] / a['served_tok_s']:.3f}x"
                for a, b in zip(d["scenarios"], sl["scenarios"])
            ),
        ]
    return "\n".join(lines) + "\n"


def history_markdown(paths: list[Path]) -> str:
    """One table over several runs' JSON files (one row per run, variant and scenario), in order."""
    lines = [
        "| run (code) | variant | scenario | model tok/s | served tok/s | served / model | TTFT p99 ms | "
        "ITL p50 / p99 ms | GPU util mean |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in paths:
        result = json.loads(path.read_text())
        run = f"{path.stem.removeprefix('serve_gpu_')} ({result['conditions'].get('code', '?')})"
        for v in result["variants"]:
            for row in v["scenarios"]:
                m, util = row["served"]["metrics"], row.get("gpu_utilisation") or {}
                lines.append(
                    f"| {run} | {v['variant']} | {row['name']} | {row['model_tok_s']:,.0f} | "
                    f"{row['served_tok_s']:,.0f} | {row['served_over_model']:.2f} | {m['ttft_ms']['p99']:.0f} | "
                    f"{m['itl_ms']['p50']:.1f} / {m['itl_ms']['p99']:.0f} | {util.get('mean', '-')} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-2-7b")
    parser.add_argument("--tokenizer", help="a saved Hugging Face tokenizer folder (required to run)")
    parser.add_argument("--history", nargs="+", type=Path, help="print one table over these runs' JSON files and stop")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--work", default="/tmp/serve_gpu", help="where the checkpoints are written")
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--max-batch", type=int, default=256, help="the server's; bounds the fit scenario")
    parser.add_argument("--only", choices=["dense", "sliced"], help="one variant only")
    parser.add_argument("--server-flags", default="", help="more `sliceserve serve` options, e.g. --no-engine-process")
    parser.add_argument(
        "--sweep-flags",
        help="several servers per variant, one per ';'-separated flag set ('' for the defaults), against the same "
        'model level, e.g. ";--max-tokens-while-decoding 512"',
    )
    parser.add_argument(
        "--requests-per-stream",
        type=int,
        help="each scenario's prompts = this x its concurrency (default: the scenario's own count, 8 per stream)",
    )
    parser.add_argument("--quick", action="store_true", help="a CPU smoke run on the tiny shape")
    parser.add_argument("--scenarios", help="comma-separated names of the scenarios to run (default: all)")
    args = parser.parse_args()
    if args.history:
        print(history_markdown(args.history), end="")
        return
    if not args.tokenizer:
        parser.error("--tokenizer is required")
    args.device = "cpu" if args.quick else "cuda"
    if args.quick:  # the model-level part runs the fast path's kernels, interpreted on a CPU
        args.shape, args.max_batch = "tiny", 4
        os.environ.setdefault("TRITON_INTERPRET", "1")
    scenarios = QUICK if args.quick else SCENARIOS
    if args.scenarios:
        wanted = args.scenarios.split(",")
        unknown = set(wanted) - {s.name for s in scenarios}
        if unknown:
            parser.error(f"no scenario {', '.join(sorted(unknown))}; there are {', '.join(s.name for s in scenarios)}")
        scenarios = [s for s in scenarios if s.name in wanted]
    if args.requests_per_stream:  # FIT's count is set once it is sized
        scenarios = [replace(s, num_prompts=args.requests_per_stream * s.concurrency) for s in scenarios]
    work, out_dir = Path(args.work), Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = [("dense", 0.0), (f"sliced-{args.sparsity:g}", args.sparsity)]
    if args.only:
        variants = variants[:1] if args.only == "dense" else variants[1:]
    result = {
        "conditions": {
            "shape": args.shape,
            "dtype": "float16",
            "max_batch": args.max_batch,
            "server_flags": args.server_flags if args.sweep_flags is None else f"swept: {args.sweep_flags}",
            "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "scenarios": [vars(s) for s in scenarios],
        },
        "variants": [],
    }
    started = time.perf_counter()

    def done(variant: dict) -> None:
        result["variants"].append(variant)
        write_json(out_dir / "serve_gpu.json", result, indent=1)
        (out_dir / "serve_gpu.md").write_text(markdown(result))
        print(f"[{time.perf_counter() - started:.0f} s] {variant['variant']} done", flush=True)

    for name, sparsity in variants:
        checkpoint = export(args.shape, sparsity, args.tokenizer, work / name, args.device)
        print(f"[{time.perf_counter() - started:.0f} s] {name} written", flush=True)
        run_variant(name, checkpoint, args, scenarios, out_dir, done)
    print(markdown(result))


if __name__ == "__main__":
    main()
