"""Pipeline stages on the fast path over two GPUs (issue 6): what slicing saves, what a pipeline costs.

(a) Llama-2-70B shapes, random weights, fp16: dense over two stages (cuda:0 and cuda:1, layers
    split by the planner) against the 25% slice on one card.
(b) Llama-2-13B, dense, over two stages against one card: the cost of the pipeline.

Per configuration: batch-1 decode tok/s (CUDA graphs, after a 128-token prompt), and the
paper's Table 11 method: prompts of 128 tokens, then `--new-tokens` tokens per row (the first
from the prefill, the rest from decode steps), batch doubled from 1 until out of memory (or
`--max-batch`, or the time budget): generated tokens per second over prefill and decode, the
best batch, in total and per card. One process: the stages run one after the other (the gain
of a pipeline is memory, not speed). One card runs `FastTransformer` (what `serve` runs on one
GPU); two run a `Pipeline` of fast stages (what `serve --gpus 2` runs). Each stage is generated directly on
its GPU (`random_models.random_stage`): dense 70B is ~138 GB, never built whole.

    python benchmarks/pipeline_throughput.py --out-dir $OUT                 # (a), then (b): ~6-8 min, 2 x H200
    python benchmarks/pipeline_throughput.py --out-dir $OUT --parts 13b     # (b) only
    python benchmarks/pipeline_throughput.py --quick --out-dir /tmp/quick   # tiny shape, seconds
    TRITON_INTERPRET=1 python benchmarks/pipeline_throughput.py --quick --cpu --out-dir /tmp/q  # no GPU

Writes pipeline_throughput.json and .md to --out-dir after every measurement. A budget
(`--time-budget`, seconds from the start; `--table11-budget` per configuration) stops the
batch doubling before the run would overrun, and says so.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import sync, versions, write_json
from random_models import llama_spec, random_stage

from sliceserve.fast.model import FastTransformer
from sliceserve.parallel.pipeline import Pipeline
from sliceserve.parallel.stages import FastStage
from sliceserve.planning.memory import Workload, stage_costs
from sliceserve.planning.model_shape import BIAS_NAMES
from sliceserve.planning.planner import balanced_stages

GiB = 2**30
NO_BIASES = dict.fromkeys(BIAS_NAMES, False)  # Llama: no biases


@dataclass(frozen=True)
class Config:
    shape: str  # a random_models.SHAPES key
    sparsity: float
    cards: int

    @property
    def name(self) -> str:
        kind = "dense" if self.sparsity == 0 else f"sliced {self.sparsity:.0%}"
        where = "1 card" if self.cards == 1 else f"{self.cards} stages"
        return f"{self.shape} {kind}, {where}"


PARTS = {
    "70b": [Config("llama-2-70b", 0.0, 2), Config("llama-2-70b", 0.25, 1)],
    "13b": [Config("llama-2-13b", 0.0, 2), Config("llama-2-13b", 0.0, 1)],
}
QUICK = [Config("tiny", 0.0, 2), Config("tiny", 0.25, 1)]


@dataclass
class Settings:
    prompt: int
    new_tokens: int
    decode_steps: int  # batch-1 decode
    max_batch: int
    prefill_tokens: int  # prompt tokens one prefill forward takes (rows grouped up to this)
    table11_budget: float  # seconds of batch doubling per configuration
    deadline: float  # time.monotonic() by which the whole run must be done
    dtype: torch.dtype
    products: list[str]  # tried in order: a configuration that fails (not out of memory) is retried

    @property
    def cache_len(self) -> int:
        return self.prompt + max(self.new_tokens, self.decode_steps) + 8


# ---- devices ------------------------------------------------------------------------------


def config_devices(cards: int, cpu: bool, quick: bool) -> list[torch.device]:
    """cuda:0..cards-1; with --quick on one GPU, cuda:0 for every stage; with --cpu, the CPU."""
    if cpu:
        return [torch.device("cpu")] * cards
    available = torch.cuda.device_count()
    if available >= cards:
        return [torch.device("cuda", i) for i in range(cards)]
    if quick and available >= 1:
        return [torch.device("cuda", 0)] * cards
    raise RuntimeError(f"{cards} GPUs needed, {available} visible")


def release(model) -> None:
    """Drop the decode graphs (they hold the cache) and give the memory back to the device."""
    model.graphs = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_gib(devices: list[torch.device]) -> dict[str, float]:
    return {str(d): round(torch.cuda.memory_allocated(d) / GiB, 2) for d in set(devices) if d.type == "cuda"}


def peak_gib(devices: list[torch.device]) -> dict[str, float]:
    return {str(d): round(torch.cuda.max_memory_allocated(d) / GiB, 2) for d in set(devices) if d.type == "cuda"}


def reset_peaks(devices: list[torch.device]) -> None:
    for device in set(devices):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


# ---- the models ---------------------------------------------------------------------------


def stage_ranges(spec, cards: int, settings: Settings) -> list[range]:
    """The planner's balanced split for the largest batch this run tries."""
    if cards == 1:
        return [range(spec.num_layers)]
    work = Workload(dtype="float16", batch=settings.max_batch, context=settings.cache_len)
    return [stage.layers for stage in balanced_stages(stage_costs(spec, NO_BIASES, work), cards)]


def build(spec, ranges: list[range], devices: list[torch.device], dtype: torch.dtype, products: str):
    """FastTransformer on one device, a Pipeline over several; each stage generated on its
    device and its reference modules dropped once wrapped (the fast layers copy q, k, v)."""
    if len(devices) == 1:
        model = FastTransformer(random_stage(spec, ranges[0], dtype=dtype, device=devices[0]), products=products)
    else:
        model = Pipeline(
            [
                FastStage(random_stage(spec, layers, dtype=dtype, device=device), device, products=products)
                for layers, device in zip(ranges, devices)
            ]
        )
    release(model)
    return model


# ---- generation ---------------------------------------------------------------------------


def prefill(model, cache, prompts: torch.Tensor, group: int) -> torch.Tensor:
    """Each prompt row into its own slot, `group` rows per forward; the first new token of each (B, 1)."""
    device = prompts.device
    firsts = []
    for start in range(0, prompts.shape[0], group):
        rows = prompts[start : start + group]
        positions = torch.arange(rows.shape[1], device=device).expand(rows.shape)
        slots = torch.arange(start, start + rows.shape[0], device=device)
        logits = model.forward_cached(rows, positions, slots, cache, last_only=True)
        firsts.append(logits[:, -1].argmax(-1, keepdim=True).to(device))
    return torch.cat(firsts)


def decode(model, cache, tokens: torch.Tensor, first_position: int, steps: int) -> torch.Tensor:
    """`steps` greedy decode steps of every row (B, 1) together, from `first_position`."""
    device = tokens.device
    slots = torch.arange(tokens.shape[0], device=device)
    positions = torch.full_like(tokens, first_position)
    for i in range(steps):
        logits = model.forward_cached(tokens, positions + i, slots, cache)
        tokens = logits[:, -1].argmax(-1, keepdim=True).to(device)
    return tokens


def random_prompts(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(batch)
    return torch.randint(0, vocab, (batch, length), device=device, generator=generator)


def capture(model, cache, batch: int, device: torch.device) -> None:
    """One untimed decode step of `batch` rows: compiles the kernels and captures the bucket's graphs."""
    zeros = torch.zeros((batch, 1), dtype=torch.long, device=device)
    model.forward_cached(zeros, zeros, torch.arange(batch, device=device), cache)


def batch1_decode(model, spec, devices: list[torch.device], settings: Settings) -> dict:
    cache = model.new_cache(slots=1, max_len=settings.cache_len)
    capture(model, cache, 1, devices[0])
    first = prefill(model, cache, random_prompts(1, settings.prompt, spec.vocab_size, devices[0]), 1)
    sync(*devices)
    start = time.perf_counter()
    decode(model, cache, first, settings.prompt, settings.decode_steps)
    sync(*devices)
    seconds = time.perf_counter() - start
    return {
        "tok_s": settings.decode_steps / seconds,
        "ms_per_token": seconds / settings.decode_steps * 1e3,
        "prompt": settings.prompt,
        "steps": settings.decode_steps,
    }


def table11_batch(model, spec, devices: list[torch.device], settings: Settings, batch: int) -> dict:
    """Prefill `batch` prompts, then new_tokens - 1 decode steps: generated tokens per second."""
    reset_peaks(devices)
    began = time.perf_counter()
    cache = model.new_cache(slots=batch, max_len=settings.cache_len)
    prompts = random_prompts(batch, settings.prompt, spec.vocab_size, devices[0])
    capture(model, cache, batch, devices[0])
    sync(*devices)
    start = time.perf_counter()
    first = prefill(model, cache, prompts, max(1, settings.prefill_tokens // settings.prompt))
    sync(*devices)
    middle = time.perf_counter()
    decode(model, cache, first, settings.prompt, settings.new_tokens - 1)
    sync(*devices)
    end = time.perf_counter()
    return {
        "batch": batch,
        "tok_s": batch * settings.new_tokens / (end - start),
        "prefill_s": middle - start,
        "decode_s": end - middle,
        "decode_tok_s": batch * (settings.new_tokens - 1) / (end - middle) if settings.new_tokens > 1 else None,
        "kv_cache_GiB": round(cache.bytes / GiB, 2),
        "peak_GiB": peak_gib(devices),
        "seconds_with_capture": end - began,
    }


# ---- Table 11: batch doubled until out of memory -----------------------------------------------


def kv_bytes(spec, layers: int, slots: int, max_len: int, dtype_bytes: int) -> int:
    """The engine's cache: slots plus one scratch slot, keys and values."""
    return 2 * layers * (slots + 1) * spec.num_kv_heads * max_len * spec.head_dim * dtype_bytes


def memory_shortfall(spec, ranges, devices, batch: int, settings: Settings) -> str | None:
    """Why `batch` cannot fit, by estimate (KV cache plus a margin for activations and graphs),
    before trying it: an out-of-memory inside a graph capture is better avoided."""
    dtype_bytes = torch.tensor([], dtype=settings.dtype).element_size()
    need: dict[torch.device, int] = defaultdict(int)
    for layers, device in zip(ranges, devices):
        need[device] += kv_bytes(spec, len(layers), batch, settings.cache_len, dtype_bytes)
    margin = settings.prefill_tokens * (3 * spec.intermediate_size + 4 * spec.original_width) * 4 + GiB
    for device, bytes_needed in need.items():
        if device.type != "cuda":
            continue
        free = torch.cuda.mem_get_info(device)[0]
        if bytes_needed + margin > free:
            return (
                f"{device}: KV cache {bytes_needed / GiB:.1f} GiB + margin {margin / GiB:.1f} GiB "
                f"> {free / GiB:.1f} GiB free"
            )
    return None


def table11(model, spec, ranges, devices, settings: Settings, result: dict, save) -> None:
    """Fills `result` (already in the results, so that what was measured survives a failure)."""
    result.update(rows=[], stopped_by=f"--max-batch {settings.max_batch}", best=None)
    deadline = min(settings.deadline, time.monotonic() + settings.table11_budget)
    batch, last_seconds = 1, 0.0
    while batch <= settings.max_batch:
        if time.monotonic() + 2.5 * last_seconds > deadline:
            result["stopped_by"] = f"time budget (batch {batch} not tried)"
            break
        shortfall = memory_shortfall(spec, ranges, devices, batch, settings)
        if shortfall is not None:
            result["rows"].append({"batch": batch, "out_of_memory": f"estimated: {shortfall}"})
            result["stopped_by"] = f"out of memory at batch {batch} (estimated)"
            break
        try:
            row = table11_batch(model, spec, devices, settings, batch)
        except torch.OutOfMemoryError as error:
            result["rows"].append({"batch": batch, "out_of_memory": str(error).splitlines()[0][:300]})
            result["stopped_by"] = f"out of memory at batch {batch}"
            break
        except Exception as error:  # noqa: BLE001 -- an out-of-memory inside a graph capture surfaces as another error
            traceback.print_exc()
            result["rows"].append({"batch": batch, "error": f"{type(error).__name__}: {error}"[:500]})
            result["stopped_by"] = f"error at batch {batch}"
            break
        finally:
            release(model)
        result["rows"].append(row)
        result["best"] = max((r for r in result["rows"] if "tok_s" in r), key=lambda r: r["tok_s"])
        print(
            f"    batch {batch}: {row['tok_s']:.1f} tok/s (prefill {row['prefill_s']:.2f} s, "
            f"decode {row['decode_s']:.2f} s)",
            flush=True,
        )
        save()
        last_seconds = row["seconds_with_capture"]
        batch *= 2


# ---- one configuration ----------------------------------------------------------------------------


def run_config(config: Config, settings: Settings, args, results: dict, save) -> None:
    entry = {"name": config.name, **asdict(config), "errors": []}
    results["configs"].append(entry)
    if time.monotonic() + 60 > settings.deadline:
        entry["skipped"] = "time budget"
        save()
        return
    try:
        devices = config_devices(config.cards, args.cpu, args.quick)
    except RuntimeError as error:
        entry["errors"].append({"error": str(error)})
        save()
        return
    spec = llama_spec(config.shape, config.sparsity)
    ranges = stage_ranges(spec, config.cards, settings)
    entry.update(devices=[str(d) for d in devices], stage_layers=[[r.start, r.stop - 1] for r in ranges])
    for products in settings.products:
        model = None
        try:
            started = time.monotonic()
            model = build(spec, ranges, devices, settings.dtype, products)
            entry.update(products=products, build_s=round(time.monotonic() - started, 1), held_GiB=held_gib(devices))
            print(f"  built on {entry['devices']} in {entry['build_s']} s, held {entry['held_GiB']}", flush=True)
            entry["batch1"] = batch1_decode(model, spec, devices, settings)
            release(model)
            print(f"    batch 1 decode: {entry['batch1']['tok_s']:.1f} tok/s", flush=True)
            save()
            entry["table11"] = {}
            table11(model, spec, ranges, devices, settings, entry["table11"], save)
            save()
            return
        except Exception as error:  # noqa: BLE001 -- record, then try the next products or configuration
            entry["errors"].append({"products": products, "error": f"{type(error).__name__}: {error}"[:1000]})
            traceback.print_exc()
            save()
            if isinstance(error, torch.OutOfMemoryError):
                return
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ---- results ----------------------------------------------------------------------------------


def conditions(args, settings: Settings) -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not args.cpu else []
    peer = None
    if len(gpus) >= 2:
        peer = torch.cuda.can_device_access_peer(0, 1)
    return {
        "gpus": gpus,
        "peer_access_0_1": peer,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "weights": "random N(0, 1/fan_in), generated on each stage's device",
        "vocab": 32000,
        "prompt": settings.prompt,
        "new_tokens_per_row": settings.new_tokens,
        "batch1_decode_steps": settings.decode_steps,
        "max_batch": settings.max_batch,
        "prefill_tokens_per_forward": settings.prefill_tokens,
        "method": "Table 11: batch doubled from 1 until out of memory; tok/s = batch x new tokens / "
        "(prefill + decode seconds); decode steps replay CUDA graphs (one per stage and batch)",
        "pipeline": "one process, stages one after the other; stream and partial sums of squares copied between GPUs",
        "stage_split": "the planner's balanced split at --max-batch and prompt + new tokens",
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def rate(tok_s: float) -> str:
    return f"{tok_s:.1f}" if tok_s >= 10 else f"{tok_s:.3g}"


def stopped_by(entry: dict) -> str:
    """Why the batch doubling stopped, or why the configuration was not measured."""
    if entry.get("table11"):
        return entry["table11"]["stopped_by"]
    if entry.get("skipped"):
        return f"skipped: {entry['skipped']}"
    return f"error: {entry['errors'][-1]['error'][:80]}" if entry["errors"] else ""


def best(entry: dict) -> dict | None:
    return (entry.get("table11") or {}).get("best")


def ratio_line(what: str, numerator: dict | None, denominator: dict | None, key: str, per_card: bool = False) -> str:
    if not numerator or not denominator:
        return f"- {what}: not measured"
    top, bottom = numerator[key], denominator[key]
    if per_card:
        top, bottom = top / numerator["cards"], bottom / denominator["cards"]
    return f"- {what}: {top / bottom:.3f}x ({rate(top)} vs {rate(bottom)} tok/s)"


def comparison_lines(results: dict) -> list[str]:
    by_name = {e["name"]: e for e in results["configs"]}
    lines = []
    pairs = [
        ("llama-2-70b sliced 25%, 1 card", "llama-2-70b dense, 2 stages", "(a) 70B: sliced on 1 card / dense on 2"),
        ("llama-2-13b dense, 2 stages", "llama-2-13b dense, 1 card", "(b) 13B: 2 stages / 1 card"),
        ("tiny sliced 25%, 1 card", "tiny dense, 2 stages", "quick: sliced on 1 card / dense on 2"),
    ]
    for top_name, bottom_name, label in pairs:
        top, bottom = by_name.get(top_name), by_name.get(bottom_name)
        if top is None or bottom is None:
            continue
        lines.append(ratio_line(f"{label}, batch-1 decode", top.get("batch1"), bottom.get("batch1"), "tok_s"))
        top_best, bottom_best = with_cards(best(top), top), with_cards(best(bottom), bottom)
        lines.append(ratio_line(f"{label}, best Table-11 throughput, total", top_best, bottom_best, "tok_s"))
        lines.append(
            ratio_line(f"{label}, best Table-11 throughput, per card", top_best, bottom_best, "tok_s", per_card=True)
        )
    return lines


def with_cards(row: dict | None, entry: dict) -> dict | None:
    return None if row is None else {**row, "cards": entry["cards"]}


def markdown(results: dict) -> str:
    lines = ["# Pipeline stages on the fast path: dense over two GPUs vs sliced on one", ""]
    lines += [f"- {k}: {v}" for k, v in results["conditions"].items()] + [""]
    lines += [
        "| configuration | devices | layers per stage | held GiB | batch-1 decode tok/s | Table 11 best tok/s "
        "(batch) | per card | stopped by |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for e in results["configs"]:
        b1, top = e.get("batch1"), best(e)
        batch1 = rate(b1["tok_s"]) if b1 else "-"
        total = f"{rate(top['tok_s'])} ({top['batch']})" if top else "-"
        per_card = rate(top["tok_s"] / e["cards"]) if top else "-"
        devices = ", ".join(e.get("devices", []))
        lines.append(
            f"| {e['name']} | {devices} | {e.get('stage_layers', '')} | {e.get('held_GiB', '')} "
            f"| {batch1} | {total} | {per_card} | {stopped_by(e)} |"
        )
    lines += ["", "Ratios in the same run:", ""] + comparison_lines(results)
    errors = [
        f"- {e['name']} ({error.get('products', '')}): {error['error'][:300]}"
        for e in results["configs"]
        for error in e["errors"]
    ]
    if errors:
        lines += ["", "Errors (a configuration that failed with Triton products was retried with library ones):", ""]
        lines += errors
    for e in results["configs"]:
        rows = (e.get("table11") or {}).get("rows") or []
        if rows:
            lines += [
                "",
                f"{e['name']} ({e.get('products', '')} products), Table 11 by batch:",
                "",
                "| batch | tok/s | prefill s | decode s | decode tok/s | KV GiB | peak GiB |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            ]
            for r in rows:
                if "tok_s" not in r:
                    why = f"out of memory: {r['out_of_memory']}" if "out_of_memory" in r else f"error: {r['error']}"
                    lines.append(f"| {r['batch']} | {why[:140]} | | | | | |")
                    continue
                decode_rate = rate(r["decode_tok_s"]) if r["decode_tok_s"] else "-"
                lines.append(
                    f"| {r['batch']} | {rate(r['tok_s'])} | {r['prefill_s']:.2f} | {r['decode_s']:.2f} "
                    f"| {decode_rate} | {r['kv_cache_GiB']} | {r['peak_GiB']} |"
                )
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (the paper: 128)")
    parser.add_argument("--decode-steps", type=int, default=64, help="timed batch-1 decode steps")
    parser.add_argument("--max-batch", type=int, default=512, help="the batch doubling stops here at the latest")
    parser.add_argument("--prefill-tokens", type=int, default=4096, help="prompt tokens per prefill forward")
    parser.add_argument("--time-budget", type=float, default=520, help="seconds from the start for the whole run")
    parser.add_argument("--table11-budget", type=float, default=110, help="seconds of batch doubling per configuration")
    parser.add_argument(
        "--products",
        nargs="+",
        default=["auto", "library"],
        help="fast-path products to try in order (a configuration that fails is retried with the next)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shape, two stages on whatever GPUs exist: seconds")
    parser.add_argument("--cpu", action="store_true", help="with --quick: on the CPU (set TRITON_INTERPRET=1)")
    return parser.parse_args()


def run_settings(args, started: float) -> Settings:
    if args.quick:
        prompt, new, steps, max_batch = (8, 3, 3, 2) if args.cpu else (32, 16, 16, 8)
        args.prompt, args.new_tokens, args.decode_steps, args.max_batch = prompt, new, steps, max_batch
    return Settings(
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        decode_steps=args.decode_steps,
        max_batch=args.max_batch,
        prefill_tokens=args.prefill_tokens,
        table11_budget=args.table11_budget,
        deadline=started + args.time_budget,
        dtype=torch.float32 if args.cpu else torch.float16,
        products=args.products,
    )


def main() -> None:
    started = time.monotonic()
    args = parse_args()
    if args.cpu and not args.quick:
        raise SystemExit("--cpu runs the --quick shape only (the kernels run interpreted)")
    settings = run_settings(args, started)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"conditions": conditions(args, settings), "configs": []}

    def save() -> None:
        write_json(out_dir / "pipeline_throughput.json", results)
        (out_dir / "pipeline_throughput.md").write_text(markdown(results))

    configs = QUICK if args.quick else [c for part in args.parts for c in PARTS[part]]
    for config in configs:
        print(f"[{time.monotonic() - started:.0f} s] {config.name}", flush=True)
        run_config(config, settings, args, results, save)
    save()
    print(f"[{time.monotonic() - started:.0f} s] done", flush=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
