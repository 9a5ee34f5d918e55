"""Throughput of dense, sliced (25%, 30%) and 2:4-sparse models on one GPU, with random weights.

One run per shape (fp16 by default) measures, for each variant:
- a batch sweep, batch 1, 2, 4, ... doubled until out of memory: decode tok/s (CUDA graphs,
  greedy argmax on the GPU), prefill tok/s, time to first token, peak GPU memory, and GPU
  power and energy per generated token from NVML;
- the paper's Table 11 method on the same measurements: prompt 128, 128 new tokens,
  throughput = batch * 128 / (prefill of every row + 128 decode steps), best over the
  doubling, under the whole card and under a 24 GiB budget (the allocator capped by
  `torch.cuda.set_per_process_memory_fraction`, which emulates a consumer card);
- Hugging Face `generate` on the same dense shape, as the tool a user would try first.
Writes throughput_{shape}.json and .md after every measurement, and PNG plots after each
variant (benchmarks/throughput_report.py; matplotlib, imported only there, and skipped where
missing). `--render` redraws the markdown and plots from JSON files on a machine without a
GPU (`pip install matplotlib` for the plots), merging runs of one shape split by --variants.

    python benchmarks/throughput_suite.py --shape llama-2-7b --out-dir $OUT
    python benchmarks/throughput_suite.py --quick --out-dir $OUT          # seconds: a smoke test
    python benchmarks/throughput_suite.py --render a.json [b.json] --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

# Grow segments in place instead of carving fixed ones: building a model leaves freed
# temporaries between its weights, and under a 24 GiB cap those holes decide what fits.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

# The GPU machine runs a plain checkout where the package may not be installed.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from common import relative_error, sync, versions  # noqa: E402
from random_models import (  # noqa: E402
    SHAPES,
    hf_llama_config,
    llama_spec,
    prune_decoder_two_four,
    random_transformer,
    weight_bytes,
)
from throughput_report import GIB, best_of, render_files, render_markdown, write_outputs  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # float32: CPU checks


@dataclass(frozen=True)
class Variant:
    label: str
    sparsity: float
    two_four: bool = False


VARIANTS = {  # run in this order: should the time budget cut a run short, sliced 30% goes first
    "dense": Variant("dense", 0.0),
    "sliced25": Variant("sliced 25%", 0.25),
    "2:4": Variant("2:4", 0.0, two_four=True),
    "sliced30": Variant("sliced 30%", 0.30),
}
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "INSUFFICIENT_RESOURCES")


# ---- the doubling loop (pure: tested on CPU) -----------------------------------------------


def is_out_of_memory(error: BaseException | None) -> bool:
    """OOM anywhere in the exception chain: an OOM inside a graph capture can surface as the
    capture's own error, with the allocator's OOM as its context."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError) or any(m in str(error) for m in OOM_MARKERS):
            return True
        error = error.__cause__ or error.__context__
    return False


def describe(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"


def double_until_oom(
    measure: Callable[[int], dict],
    *,
    cap: int,
    on_row: Callable[[dict], None] = lambda row: None,
    out_of_time: Callable[[], bool] = lambda: False,
) -> dict:
    """measure(1), measure(2), measure(4), ... until one runs out of memory, fails, or the cap
    or the time budget is reached. Returns the rows and why the doubling stopped."""
    rows, batch = [], 1
    while batch <= cap:
        if out_of_time():
            return {"rows": rows, "stop": f"time budget reached before batch {batch}", "out_of_memory_at": None}
        try:
            row = measure(batch)
        except Exception as error:  # leaving this block drops the traceback, so the caller can free its tensors
            if is_out_of_memory(error):
                return {"rows": rows, "stop": f"out of memory at batch {batch}", "out_of_memory_at": batch}
            return {
                "rows": rows,
                "stop": f"error at batch {batch}: {describe(error)}",
                "out_of_memory_at": None,
                "traceback": traceback.format_exc(),
            }
        rows.append(row)
        on_row(row)
        batch *= 2
    return {"rows": rows, "stop": f"cap of {cap} reached", "out_of_memory_at": None}


# ---- GPU bookkeeping ----------------------------------------------------------------------


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def allocator_budget(budget_bytes: int | None, device: torch.device):
    """Cap PyTorch's allocator at budget_bytes (None: the whole card). The cap counts every
    byte the allocator holds, the weights already loaded included."""
    if budget_bytes is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


class Deadline:
    """Stop starting new work near the device's per-command limit, so the results get written."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end


# ---- power and energy (NVML, optional) --------------------------------------------------------


@dataclass
class Nvml:
    module: object
    handle: object


def open_nvml(device: torch.device) -> tuple[Nvml | None, str | None]:
    """NVML's handle of the torch device (matched by UUID: NVML ignores CUDA_VISIBLE_DEVICES),
    or None and why."""
    if device.type != "cuda":
        return None, "not a CUDA device"
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # nvidia-ml-py missing on the image, or no NVML library
        return None, f"unavailable ({describe(error)})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID((uuid if uuid.startswith("GPU-") else f"GPU-{uuid}").encode())
    except Exception:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    return Nvml(pynvml, handle), None


def nvml_facts(nvml: Nvml | None) -> dict:
    if nvml is None:
        return {}
    facts = {}
    for name, read in (
        ("driver", lambda m, h: m.nvmlSystemGetDriverVersion()),
        ("power_limit_W", lambda m, h: m.nvmlDeviceGetPowerManagementLimit(h) / 1000),
    ):
        try:
            value = read(nvml.module, nvml.handle)
            facts[name] = value.decode() if isinstance(value, bytes) else value
        except Exception:
            pass
    return facts


class PowerMeter:
    """While open: GPU power sampled every `interval` s by a thread, and the total-energy
    counter read at both ends (boards without the counter leave the samples alone)."""

    def __init__(self, nvml: Nvml | None, unavailable: str | None, interval: float = 0.05):
        self.nvml, self.unavailable, self.interval = nvml, unavailable, interval
        self.samples: list[float] = []

    def read_energy_mj(self) -> int | None:
        try:
            return self.nvml.module.nvmlDeviceGetTotalEnergyConsumption(self.nvml.handle)
        except Exception:
            return None

    def sample(self) -> None:
        while not self.stopping.is_set():
            try:
                self.samples.append(self.nvml.module.nvmlDeviceGetPowerUsage(self.nvml.handle) / 1000)
            except Exception:
                pass
            self.stopping.wait(self.interval)

    def __enter__(self) -> PowerMeter:
        if self.nvml is None:
            return self
        self.samples = []
        self.stopping = threading.Event()
        self.energy_start = self.read_energy_mj()
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.nvml is None:
            return
        self.stopping.set()
        self.thread.join()
        self.seconds = time.perf_counter() - self.started
        self.energy_end = self.read_energy_mj()

    def summary(self, tokens: int) -> dict:
        """Mean power and joules per generated token (the caller synchronised before closing)."""
        if self.nvml is None:
            return {"unavailable": self.unavailable}
        out = {"seconds": self.seconds, "tokens": tokens, "power_samples": len(self.samples)}
        if self.samples:
            out["mean_W"] = sum(self.samples) / len(self.samples)
            out["J_per_token_sampled"] = out["mean_W"] * self.seconds / tokens
        if self.energy_start is not None and self.energy_end is not None:
            joules = (self.energy_end - self.energy_start) / 1000
            out["mean_W_counter"] = joules / self.seconds
            out["J_per_token_counter"] = joules / tokens
        return out


# ---- models ------------------------------------------------------------------------------------


def build_fast_model(
    shape: str, variant: Variant, dtype: torch.dtype, device: torch.device, products: str = "auto", check_len: int = 64
):
    """The variant's FastTransformer (the plain model is dropped: only the fast path stays on
    the GPU) and facts about it. A 2:4 model is checked against our dense kernels on the same
    pruned weights, so that a broken sparse path cannot post a fast number."""
    from sliceserve.fast.model import FastTransformer

    started = time.perf_counter()
    spec = llama_spec(shape, variant.sparsity)
    model = random_transformer(spec, dtype=dtype, device=device.type)
    info = {"residual_width": spec.layers[0].input_width, "dense_format_weight_bytes": weight_bytes(model)}
    if variant.two_four:
        prune_decoder_two_four(model)
        fast = FastTransformer(model, semi_structured=True, products=products)
        info["check"] = {"vs_dense_kernels_rel_error": two_four_check(model, fast, spec.vocab_size, check_len)}
    else:
        fast = FastTransformer(model, products=products)
    del model
    free_memory(device)
    sync(device)
    info["build_s"] = time.perf_counter() - started
    info["resident_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    return fast, info


def two_four_check(model, sparse_fast, vocab: int, length: int) -> float:
    """Relative error of the semi-structured path's logits against our dense kernels on the same weights."""
    from sliceserve.fast.model import FastTransformer

    device = model.input_device
    generator = torch.Generator(device=device.type).manual_seed(3)
    tokens = torch.randint(0, vocab, (1, length), device=device, generator=generator)
    reference = FastTransformer(model)
    try:
        return relative_error(sparse_fast(tokens)[0, -1], reference(tokens)[0, -1])
    finally:
        del reference


class EagerDecoder:
    """On a CPU (a smoke test of this script only): the decode step launched eagerly, in
    place of DecodeGraphs, with the same run()."""

    def __init__(self, fast, cache):
        self.fast, self.cache = fast, cache

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.fast.forward_cached(tokens[:, None], positions[:, None], slots, self.cache)[:, 0]


def make_decoder(fast, cache, batch: int, device: torch.device):
    """Decode steps of `batch` rows, captured in a CUDA graph here, outside any timed region."""
    if device.type != "cuda":
        return EagerDecoder(fast, cache)
    from sliceserve.fast.graphs import DecodeGraphs

    torch.cuda.empty_cache()  # hand the prefill's activations back before the graph's pool takes its own
    graphs = DecodeGraphs([fast], [cache])
    graphs.graph(batch)
    return graphs


# ---- one batch size: prefill, decode, time to first token, memory, energy --------------------


def prefill_rows(fast, prompts: torch.Tensor, slots: torch.Tensor, cache, rows_per_call: int) -> torch.Tensor:
    """Prefill every row's prompt, `rows_per_call` rows a forward; returns the greedy first tokens."""
    length = prompts.shape[1]
    positions = torch.arange(length, device=prompts.device)
    firsts = []
    for start in range(0, prompts.shape[0], rows_per_call):
        rows, row_slots = prompts[start : start + rows_per_call], slots[start : start + rows_per_call]
        logits = fast.forward_cached(rows, positions.expand(rows.shape[0], length), row_slots, cache, last_only=True)
        firsts.append(logits[:, -1].argmax(-1))
    return torch.cat(firsts)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(wall seconds of fn() with the device drained before and after, its result)"""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = sorted(timed(fn, device)[0] for _ in range(repeats))
    return times[len(times) // 2]


def decode_steps(decoder, first_tokens: torch.Tensor, start_position: int, slots: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy decode steps of every row (argmax on the device, as a server would)."""
    device = first_tokens.device
    positions = torch.full_like(first_tokens, start_position)
    tokens = first_tokens
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        tokens = decoder.run(tokens, positions + i, slots).argmax(-1)
    sync(device)
    return time.perf_counter() - start


def measure_energy(
    meter: PowerMeter, decoder, first_tokens, start_position: int, slots, steps: int, min_seconds: float
) -> dict:
    """Power and J/token over repeated decode loops lasting at least min_seconds (NVML's power
    reading averages over a window, so a short loop alone would read low)."""
    tokens = 0
    with meter:
        start = time.perf_counter()
        while True:
            decode_steps(decoder, first_tokens, start_position, slots, steps)
            tokens += first_tokens.shape[0] * steps
            if time.perf_counter() - start >= min_seconds:
                break
    return meter.summary(tokens)


def measure_batch(
    fast,
    batch: int,
    *,
    prompt: int,
    new_tokens: int,
    rows_per_call: int,
    device: torch.device,
    meter: PowerMeter | None,
    energy_seconds: float,
    ttft_repeats: int = 5,
) -> dict:
    """Every figure of one batch size, from one KV cache of prompt + new_tokens positions a row."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = decoder = None
    try:
        with torch.inference_mode():
            cache = fast.new_cache(slots=batch, max_len=prompt + new_tokens)
            generator = torch.Generator(device=device.type).manual_seed(batch)
            prompts = torch.randint(0, fast.spec.vocab_size, (batch, prompt), device=device, generator=generator)
            slots = torch.arange(batch, device=device)

            # Prefill: one untimed call first (kernel compilation, allocator), then the timed passes.
            prefill_rows(fast, prompts[:rows_per_call], slots[:rows_per_call], cache, rows_per_call)
            passes = [
                timed(lambda: prefill_rows(fast, prompts, slots, cache, rows_per_call), device)
                for _ in range(3 if batch * prompt <= 8192 else 1)
            ]
            prefill_s = sorted(seconds for seconds, _ in passes)[len(passes) // 2]
            firsts = passes[-1][1]

            decoder = make_decoder(fast, cache, batch, device)
            decode_steps(decoder, firsts, prompt, slots, 2)  # warm-up replays
            decode_s = decode_steps(decoder, firsts, prompt, slots, new_tokens)

            # A new request joining the batch: its prefill, then the batch's next decode step.
            def first_token() -> None:
                token = prefill_rows(fast, prompts[:1], slots[:1], cache, 1)
                decoder.run(torch.cat([token, firsts[1:]]), torch.full_like(firsts, prompt), slots)

            ttft_s = median_seconds(first_token, device, repeats=ttft_repeats)
            energy = None
            if meter is not None and energy_seconds > 0:
                energy = (
                    measure_energy(meter, decoder, firsts, prompt, slots, new_tokens, energy_seconds)
                    if meter.nvml is not None
                    else meter.summary(0)
                )
            row = {
                "batch": batch,
                "prompt": prompt,
                "new_tokens": new_tokens,
                "prefill_rows_per_call": rows_per_call,
                "prefill_s": prefill_s,
                "prefill_tok_s": batch * prompt / prefill_s,
                "decode_s": decode_s,
                "decode_tok_s": batch * new_tokens / decode_s,
                "ms_per_step": decode_s / new_tokens * 1e3,
                "end_to_end_tok_s": batch * new_tokens / (prefill_s + decode_s),
                "ttft_ms": ttft_s * 1e3,
                "kv_cache_bytes": cache.bytes,
                "energy": energy,
            }
            if device.type == "cuda":
                row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            return row
    finally:
        del cache, decoder  # the graphs' memory pool goes with the decoder
        fast.graphs = None  # (never set here, but a graph left there would pin the cache)
        free_memory(device)


# ---- Hugging Face generate -------------------------------------------------------------------


def build_hf_llama(shape: str, dtype: torch.dtype, device: torch.device):
    """Transformers' Llama of the shape, random weights, built directly in `dtype`
    (gpu_fast_path.time_hf_generate is fixed to the 7B shape and builds in float32 first)."""
    import transformers

    config = hf_llama_config(shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # what from_pretrained does: float32 first would need twice the memory
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def time_hf_generate(
    model, batch: int, prompt: int, new_tokens: int, device: torch.device, meter: PowerMeter | None
) -> dict:
    vocab = model.config.vocab_size
    tokens = torch.randint(1, vocab, (batch, prompt), device=device)  # no pad id (0) inside the prompts
    kwargs = dict(attention_mask=torch.ones_like(tokens), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(tokens, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        sync(device)
        with meter if meter is not None else nullcontext():
            start = time.perf_counter()
            model.generate(tokens, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            sync(device)
            seconds = time.perf_counter() - start
    row = {
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tok_s": batch * new_tokens / seconds,
    }
    if meter is not None:
        row["energy"] = meter.summary(batch * new_tokens)
    return row


# ---- the run ----------------------------------------------------------------------------------


def conditions(args, device: torch.device, nvml: Nvml | None, nvml_missing: str | None) -> dict:

    rows_per_call = max(1, args.prefill_tokens // args.prompt)
    c = {
        "shape": args.shape,
        "shape_sizes": SHAPES[args.shape],
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "weights": "random N(0, 1/fan_in); sliced variants: the slicer's uniform widths (rounded to 8) and random "
        "shortcut matrices; 2:4: the dense weights of q, k, v, o, gate, up, down pruned by magnitude "
        "(2 largest |w| of each 4 consecutive inputs), served as semi-structured sparse tensors "
        "(cuSPARSELt) inside the decode graphs; embedding and head dense in every variant",
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "prefill": f"random prompts of {args.prompt} tokens, up to {rows_per_call} rows ({rows_per_call * args.prompt} "
        f"tokens) per forward; timed after one untimed call (median of 3 passes up to 8192 "
        "tokens, else one); "
        "the serving engine prefills one request at a time, this is the model's batched prefill",
        "decode": "greedy, argmax on the GPU, one CUDA graph per batch size (captured before timing), "
        f"{args.new_tokens} steps after the prompt; KV cache of {args.prompt + args.new_tokens} positions "
        "a row (plus one scratch row)",
        "ttft": "prefill of one prompt of the batch + one decode step of the whole batch (median of 5)",
        "end_to_end": f"the paper's Table 11 method: batch * {args.new_tokens} / (prefill of every row + "
        f"{args.new_tokens} decode steps); graph capture and model build excluded",
        "peak_memory": "torch.cuda.max_memory_allocated over the batch's measurement: weights, KV cache, graph "
        "pool and activations",
        "budgets": {
            "whole card": "no cap beyond the card",
            f"{args.budget_gib:g} GiB": f"torch.cuda.set_per_process_memory_fraction({args.budget_gib:g} GiB / "
            "card memory), set after the model is built: the cap covers everything PyTorch's allocator "
            "holds, the weights included; the CUDA context is outside it",
        },
        "energy": (
            f"NVML: power sampled every 50 ms by a thread and the total-energy counter's delta, over decode "
            f"loops of at least {args.energy_seconds:g} s at each batch (whole card only)"
            if nvml is not None
            else nvml_missing
        ),
        "hf_generate": f"transformers LlamaForCausalLM, no torch.compile, default attention, {args.dtype}, "
        f"prompt {args.prompt}, {args.hf_new_tokens} new tokens (min = max), greedy; time includes "
        "the prompt's prefill",
        "versions": versions(),
        "products": args.products,
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"),
        "tag": args.tag,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    c |= nvml_facts(nvml)
    if args.quick:
        c["quick"] = "smoke test: tiny shape, small batches and few steps; not a measurement to report"
    return c


def run_variant(
    variant: Variant,
    args,
    result: dict,
    device: torch.device,
    meter: PowerMeter | None,
    save: Callable[[], None],
    deadline: Deadline,
) -> None:
    entry = result["variants"][variant.label] = {
        "sparsity": variant.sparsity,
        "two_four": variant.two_four,
        "budgets": {},
    }
    if deadline.passed():
        entry["error"] = "skipped: time budget reached"
        return
    print(f"== {variant.label}: building", flush=True)
    try:
        fast, info = build_fast_model(args.shape, variant, DTYPES[args.dtype], device, args.products)
    except Exception as error:
        entry["error"] = f"could not build: {describe(error)}"
        entry["traceback"] = traceback.format_exc()
    else:
        entry |= info
    save()
    if "error" in entry:
        free_memory(device)
        print(f"   {entry['error']}\n{entry['traceback']}", flush=True)
        return
    print(f"   {json.dumps(info)}", flush=True)
    rows_per_call = max(1, args.prefill_tokens // args.prompt)
    budgets = {} if args.skip_whole_card else {"whole card": None}
    if args.budget_gib > 0:
        budgets[f"{args.budget_gib:g} GiB"] = int(args.budget_gib * GIB)
    for label, budget_bytes in budgets.items():
        record = entry["budgets"][label] = {"budget_bytes": budget_bytes, "rows": [], "stop": "running"}
        if budget_bytes is not None and device.type != "cuda":
            record["stop"] = "skipped: a memory budget needs CUDA"
            continue
        energy_seconds = args.energy_seconds if budget_bytes is None else 0.0  # power does not depend on the cap

        def measure(batch: int) -> dict:
            return measure_batch(
                fast,
                batch,
                prompt=args.prompt,
                new_tokens=args.new_tokens,
                rows_per_call=rows_per_call,
                device=device,
                meter=meter,
                energy_seconds=energy_seconds,
            )

        def on_row(row: dict) -> None:
            record["rows"].append(row)
            save()
            print(f"   [{label}] {json.dumps(row)}", flush=True)

        free_memory(device)
        with allocator_budget(budget_bytes, device):
            outcome = double_until_oom(measure, cap=args.max_batch, on_row=on_row, out_of_time=deadline.passed)
        free_memory(device)
        record |= {
            "stop": outcome["stop"],
            "out_of_memory_at": outcome["out_of_memory_at"],
            "best": best_of(record["rows"]),
        }
        if "traceback" in outcome:
            record["traceback"] = outcome["traceback"]
            print(outcome["traceback"], flush=True)
        save()
        print(f"   [{label}] stopped: {outcome['stop']}; best {record['best']}", flush=True)
    del fast
    free_memory(device)


def run_hf_generate(
    args, result: dict, device: torch.device, meter: PowerMeter | None, save: Callable[[], None], deadline: Deadline
) -> None:
    if deadline.passed():
        result["hf_generate"].append({"error": "skipped: time budget reached"})
        return
    print("== Hugging Face generate: building", flush=True)
    try:
        model = build_hf_llama(args.shape, DTYPES[args.dtype], device)
        result["hf_attention"] = getattr(model.config, "_attn_implementation", None)
    except Exception as error:
        result["hf_generate"].append({"error": f"could not build: {describe(error)}"})
        free_memory(device)
        save()
        return
    for batch in args.hf_batches:
        if deadline.passed():
            result["hf_generate"].append({"batch": batch, "error": "skipped: time budget reached"})
            break
        try:
            row = time_hf_generate(model, batch, args.prompt, args.hf_new_tokens, device, meter)
        except Exception as error:
            row = {"batch": batch, "error": "out of memory" if is_out_of_memory(error) else describe(error)}
            if not is_out_of_memory(error):
                print(traceback.format_exc(), flush=True)
        free_memory(device)
        result["hf_generate"].append(row)
        save()
        print(f"   {json.dumps(row)}", flush=True)
        if "error" in row:
            break
    del model
    free_memory(device)


def run_suite(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # some torch.cuda calls insist on an index
        device = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.time_budget_s)
    nvml, nvml_missing = open_nvml(device)
    meter = PowerMeter(nvml, nvml_missing) if device.type == "cuda" else None
    result = {"conditions": conditions(args, device, nvml, nvml_missing), "variants": {}, "hf_generate": []}
    print(json.dumps(result["conditions"], indent=1), flush=True)

    def save() -> None:
        write_outputs(result, out_dir, plots=False)

    for key in args.variants:
        try:
            run_variant(VARIANTS[key], args, result, device, meter, save, deadline)
        except Exception as error:  # whatever went wrong, the other variants still run
            entry = result["variants"].setdefault(VARIANTS[key].label, {"budgets": {}})
            entry["error"], entry["traceback"] = describe(error), traceback.format_exc()
            print(f"   {VARIANTS[key].label}: {entry['traceback']}", flush=True)
        free_memory(device)
        write_outputs(result, out_dir, plots=True)
    if not args.skip_hf:
        run_hf_generate(args, result, device, meter, save, deadline)
    written = write_outputs(result, out_dir, plots=True)
    print(render_markdown(result), flush=True)
    print("wrote", ", ".join(str(p) for p in written), flush=True)
    if not any(p.suffix == ".png" for p in written):
        print("matplotlib is not installed: no plots; draw them elsewhere with --render", flush=True)
    return result


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-2-7b", choices=list(SHAPES))
    parser.add_argument(
        "--out-dir", default=None, help="default benchmarks/results (with --render: the first JSON's folder)"
    )
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=1024,
        help="cap of the doubling; on an 80 GB card the 7B/13B shapes run out of memory before it",
    )
    parser.add_argument("--prefill-tokens", type=int, default=4096, help="prompt tokens per prefill forward")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="the emulated card's memory; 0 skips it")
    parser.add_argument("--skip-whole-card", action="store_true", help="only the capped budget")
    parser.add_argument(
        "--products",
        default="auto",
        choices=["auto", "triton", "library"],
        help="the fast path's matrix products (sliceserve/fast/matmul_backends.py)",
    )
    parser.add_argument("--tag", help="appended to the output files' names, e.g. 24gib")
    parser.add_argument("--energy-seconds", type=float, default=1.0, help="shortest decode window for power readings")
    parser.add_argument("--hf-batches", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--hf-new-tokens", type=int, default=128)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=510.0,
        help="start no new measurement after this many seconds (the device allows 600 a command)",
    )
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test this script (with TRITON_INTERPRET=1)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, batches up to 4, few steps: seconds")
    parser.add_argument("--render", nargs="+", metavar="RESULTS_JSON", help="redraw markdown and plots, no GPU needed")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.prompt, args.new_tokens, args.max_batch = "tiny", 16, 8, 4
        args.hf_batches, args.hf_new_tokens, args.energy_seconds = [1, 2], 8, 0.1
    if not args.render and args.out_dir is None:
        args.out_dir = "benchmarks/results"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        for path in render_files(args.render, args.out_dir):
            print("wrote", path)
        return
    run_suite(args)


if __name__ == "__main__":
    main()
