"""Decode speed of quantized weights on the fast path, with gpt-fast's own int8 and int4 as the
anchor in the same run (issue 17, point 4).

One run on one GPU, Llama-2-7B shapes (13B with --shape llama-2-13b), random weights, fp16:
1. copy bandwidth (the roofline's denominator);
2. the quantized products alone at decode size (one row), over a few tile shapes per bit width
   (block_n, inputs a step, warps, stages): which reads fastest (kernels/fused_linear.py's
   QUANTIZED_DECODE_TILES are a guess until this has run; the model rows below use the sweep's
   best, or --quantized-tiles, and the results say which), each checked against its reference;
3. batch-1 and batch-16 decode tok/s (CUDA graphs, greedy argmax on the GPU, prompt 128,
   200 new tokens) of dense fp16, sliced 25% fp16, dense int8, dense int4, sliced 25% int8 and
   sliced 25% int4 (groups of 128 inputs; round-to-nearest codes of the random weights, on the
   GPU; the sliced rows quantize the shortcut matrices too; embeddings and head fp16), each
   checked against the reference model with the dequantized weights;
4. gpt-fast's int8 and int4 weight-only decode (its model.py, quantize.py and generate.py,
   read from an ignored `.gptfast/` folder: third-party code, never committed), its
   Transformer with Llama-2 args and random weights, WeightOnlyInt8QuantHandler /
   WeightOnlyInt4QuantHandler (groups of 128), bf16 as its generate.py runs, decode_one_token
   compiled with mode="reduce-overhead" and its inductor settings. gpt-fast quantizes the
   head too; ours keeps it fp16 (0.26 GB of reads a step at 7B).
Writes quant_decode_{shape}.json and .md under --out-dir after every row, with the issue's
targets as ratios in the same run (met, or missed by how much).

    PYTHONPATH=$PWD python benchmarks/quant_decode_gpu.py --out-dir $OUT
    PYTHONPATH=$PWD python benchmarks/quant_decode_gpu.py --sweep-only --out-dir $OUT   # 1. and 2. only
    PYTHONPATH=$PWD python benchmarks/quant_decode_gpu.py --no-sweep --quantized-tiles 4:32,256,4,4 \
        --variants "dense int4" "sliced 25% int4" --batches 1 --gptfast-modes --out-dir $OUT   # a short run
    python benchmarks/quant_decode_gpu.py --smoke --out-dir /tmp/quant-smoke   # CPU: tiny shapes, interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from common import graph_ms, measured_copy_gbps, relative_error, sync, versions, write_json  # noqa: E402
from random_models import SHAPES, llama_spec, random_transformer  # noqa: E402

from sliceserve.fast.graphs import DecodeGraphs  # noqa: E402
from sliceserve.fast.model import FastTransformer  # noqa: E402
from sliceserve.fast.quantized_weights import weight_bytes  # noqa: E402
from sliceserve.kernels import fused_linear as fused  # noqa: E402
from sliceserve.kernels.fused_linear import (  # noqa: E402
    DECODE_TILES,
    TileConfig,
    fused_linear,
    fused_linear_reference,
)
from sliceserve.kernels.gated_linear import gated_linear, gated_linear_reference  # noqa: E402
from sliceserve.model.quant_format import QuantFormat  # noqa: E402
from sliceserve.model.quantized import QuantizedWeight  # noqa: E402
from sliceserve.quantization.checkpoint_writer import stored  # noqa: E402
from sliceserve.quantization.grids import round_to_nearest  # noqa: E402

DTYPE = torch.float16
# name: (sparsity, bits or None)
VARIANTS = {
    "dense fp16": (0.0, None),
    "sliced 25% fp16": (0.25, None),
    "dense int8": (0.0, 8),
    "dense int4": (0.0, 4),
    "sliced 25% int8": (0.25, 8),
    "sliced 25% int4": (0.25, 4),
}
BLOCK_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
SHORTCUTS = ("attn_shortcut", "mlp_shortcut")
# Decode tiles tried for quantized weights, by bits: (block_m, block_n, inputs a step, warps,
# stages); the first of each is QUANTIZED_DECODE_TILES' guess. Each compiles anew on the GPU
# (three kernels: qkv, o and down, gate+up). Every warp holds the whole (16, step) activation
# tile as a dot operand: compiled for sm_90 (Triton 3.9), 256 inputs a step take 164-180
# registers, none spilled; 512 spill in gate+up (4 bits: 392 bytes), and 64 x 512 anywhere.
# 64 columns with 8 warps keeps each warp's share of 32 columns with 4.
CANDIDATE_TILES = {
    8: [
        TileConfig(16, 32, 256, 4, 4),
        TileConfig(16, 32, 256, 4, 6),
        TileConfig(16, 32, 128, 4, 5),
        TileConfig(16, 64, 128, 4, 5),
        TileConfig(16, 64, 256, 8, 4),
    ],
    4: [
        TileConfig(16, 32, 256, 4, 4),
        TileConfig(16, 32, 256, 4, 6),
        TileConfig(16, 32, 128, 4, 5),
        TileConfig(16, 32, 512, 4, 4),
        TileConfig(16, 64, 256, 8, 4),
    ],
}
GPTFAST_ARGS = {"llama-2-7b": "7B", "llama-2-13b": "13B"}
TARGETS = [  # (what, numerator row, denominator row, target ratio), batch 1
    ("sliced 25% + int4 / dense fp16", "sliced 25% int4", "dense fp16", 3.0),
    ("sliced 25% + int4 / gpt-fast int4", "sliced 25% int4", "gpt-fast int4", 1.2),
    ("dense int8 / dense fp16", "dense int8", "dense fp16", 1.8),
    ("dense + int4 / gpt-fast int4", "dense int4", "gpt-fast int4", 1.1),
]


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ---- timing -------------------------------------------------------------------------------


# ---- quantized models ---------------------------------------------------------------------


def quantized(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest codes of `weight` (the quantizer `sliceserve quantize --method rtn` runs)."""
    fmt = QuantFormat(bits, group_size, ("attn.q",))
    codes, scales, zeros = round_to_nearest(weight.float(), fmt)
    tensors = stored(codes, scales.to(weight.dtype), zeros, fmt)
    return QuantizedWeight(
        tensors["qweight"], tensors["scales"], tensors.get("zeros"), bits, group_size, weight.shape[1]
    )


@torch.no_grad()
def quantize_in_place(model, bits: int, group_size: int) -> None:
    """Every block matrix (shortcuts included) quantized: the model's float weights become the
    dequantized ones (the reference model of the codes), and each block keeps the codes in
    `quantized_weights`, as the loader leaves a quantized checkpoint (model/loader.py)."""
    for block in model.layers:
        kept = {}
        for name in BLOCK_MATRICES + SHORTCUTS:
            part, _, leaf = name.rpartition(".")
            owner = getattr(block, part) if part else block
            module = getattr(owner, leaf, None)
            if module is None:
                continue
            tensor = module.weight if isinstance(module, torch.nn.Linear) else module
            kept[name] = quantized(tensor, bits, group_size)
            tensor.copy_(kept[name].dequantize(tensor.dtype))
        block.quantized_weights = kept


def step_bytes(fast: FastTransformer) -> int:
    """Bytes of weights a decode step reads: every product's weights (codes, scales, zeros where
    quantized), biases and the head; not the embedding table."""
    total = weight_bytes(fast.head.weight)
    for layer in fast.layers:
        for value in vars(layer).values():
            total += weight_bytes(value)
    return total


@contextlib.contextmanager
def quantized_tiles(chosen: dict[int, TileConfig]):
    """Quantized products launched inside use these decode tiles (CUDA graphs keep them)."""
    saved = dict(fused.QUANTIZED_DECODE_TILES)
    fused.QUANTIZED_DECODE_TILES.update(chosen)
    try:
        yield
    finally:
        fused.QUANTIZED_DECODE_TILES.clear()
        fused.QUANTIZED_DECODE_TILES.update(saved)


# ---- the kernels alone --------------------------------------------------------------------


def tile_sweep(shape: dict, group_size: int, copy: float | None, device: str, bit_widths: list[int]) -> list[dict]:
    """One decode row through each candidate's tiles, per bit width, on the layer's four
    products (weights rotated past the L2): qkv with the norm, o and down with the residual,
    gate and up gated, each checked against its reference once. The fp16 decode tiles on the
    same products as the baseline. Without a GPU (the smoke test) the checks only, no timing."""
    on_gpu = device == "cuda"
    width, inter = shape["width"], shape["intermediate"]
    qkv_rows = width + 2 * shape["kv_heads"] * (width // shape["heads"])
    x = torch.randn(1, width, device=device, dtype=DTYPE)
    act = torch.randn(1, inter, device=device, dtype=DTYPE)
    norm = (x.float().pow(2).sum(-1, keepdim=True), width, 1e-5)

    def weight(n: int, k: int, bits: int | None):
        w = torch.randn(n, k, device=device, dtype=DTYPE) * k**-0.5
        return w if bits is None else quantized(w, bits, group_size)

    cases = {  # name: ((n, k) of each weight, the product, its reference)
        "qkv": (
            [(qkv_rows, width)],
            lambda w, t: fused_linear(x, w[0], norm=norm, tiles=t)[0],
            lambda w: fused_linear_reference(x, w[0], norm=norm)[0],
        ),
        "o": (
            [(width, width)],
            lambda w, t: fused_linear(x, w[0], residual=x, sumsq=True, tiles=t)[0],
            lambda w: fused_linear_reference(x, w[0], residual=x)[0],
        ),
        "gate+up": (
            [(inter, width)] * 2,
            lambda w, t: gated_linear(x, w[0], w[1], norm=norm, tiles=t),
            lambda w: gated_linear_reference(x, w[0], w[1], norm=norm),
        ),
        "down": (
            [(width, inter)],
            lambda w, t: fused_linear(act, w[0], residual=x, sumsq=True, tiles=t)[0],
            lambda w: fused_linear_reference(act, w[0], residual=x)[0],
        ),
    }
    rows = []
    for bits in [None, *bit_widths]:
        for name, (shapes, product, reference) in cases.items():
            one = [weight(n, k, bits) for n, k in shapes]
            read = sum(weight_bytes(w) for w in one)
            more = int(300e6 // read) if on_gpu else 0
            copies = [one] + [[weight(n, k, bits) for n, k in shapes] for _ in range(more)]
            expected = reference(one)
            for tiles in [DECODE_TILES] if bits is None else CANDIDATE_TILES[bits]:
                row = {"bits": bits or 16, "product": name, "weights": shapes, "tiles": tiles.__dict__}
                try:
                    row["rel_error"] = relative_error(product(one, tiles), expected)
                    if on_gpu:
                        ms = graph_ms(lambda: [product(w, tiles) for w in copies], inner=5) / len(copies)
                except Exception as error:  # out of shared memory, say
                    rows.append({**row, "error": str(error)[:200]})
                    continue
                if on_gpu:
                    gbps = read / (ms / 1e3) / 1e9
                    row.update(us=ms * 1e3, GBps=gbps, fraction_of_copy_bw=gbps / copy)
                rows.append(row)
            del copies, one, expected
            if on_gpu:
                torch.cuda.empty_cache()
        log("swept", bits or 16, "bits")
    return rows


def best_tiles(sweep: list[dict]) -> dict[int, dict]:
    """Per bit width, the candidate whose four products take least time together (a layer)."""
    best = {}
    for bits in (8, 4):
        totals: dict[str, list] = {}
        for r in sweep:
            if r["bits"] == bits and "us" in r:
                totals.setdefault(json.dumps(r["tiles"]), []).append(r["us"])
        complete = {k: sum(v) for k, v in totals.items() if len(v) == 4}
        if complete:
            key = min(complete, key=complete.get)
            best[bits] = {"tiles": json.loads(key), "layer_products_us": complete[key]}
    return best


# ---- our fast path ------------------------------------------------------------------------


@torch.inference_mode()
def check_fast_path(model, fast: FastTransformer, device: str, length: int) -> dict:
    """Fast path against the reference model (dequantized weights) in fp16: prefill logits, and
    one decode step after a cached prefill (replayed from a CUDA graph on a GPU)."""
    generator = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, model.spec.vocab_size, (1, length), device=device, generator=generator)
    expected = model(tokens)
    prefill = fast(tokens[:, :-1])
    cache = fast.new_cache(slots=2, max_len=length + 8)
    slot = torch.tensor([1], device=device)
    fast.forward_cached(tokens[:, :-1], torch.arange(length - 1, device=device)[None], slot, cache, last_only=True)
    last = torch.tensor([length - 1], device=device)
    if device == "cuda":
        step = DecodeGraphs([fast], [cache]).run(tokens[0, -1:], last, slot)[0]
    else:
        step = fast.forward_cached(tokens[:, -1:], last[None], slot, cache)[0, 0]
    return {
        "prefill_rel_error": relative_error(prefill, expected[:, :-1]),
        "decode_rel_error": relative_error(step, expected[0, -1]),
    }


@torch.inference_mode()
def time_decode(fast: FastTransformer, batch: int, prompt: int, steps: int, weights: int, copy: float | None) -> dict:
    """Decode tok/s of `batch` rows after a prompt each: CUDA graphs and on-GPU argmax on a GPU,
    plain steps elsewhere (the smoke test)."""
    device = fast.input_device.type
    spec = fast.spec
    cache = fast.new_cache(slots=batch, max_len=prompt + steps + 8)
    slots = torch.arange(batch, device=device)
    tokens = torch.randint(0, spec.vocab_size, (batch, prompt), device=device)
    for row in range(batch):
        positions = torch.arange(prompt, device=device)[None]
        fast.forward_cached(tokens[row : row + 1], positions, slots[row : row + 1], cache, last_only=True)
    graphs = DecodeGraphs([fast], [cache]) if device == "cuda" else None
    if graphs is not None:
        graphs.graph(batch)  # captured outside the timed loop
    next_tokens, positions = tokens[:, -1], torch.full((batch,), prompt, device=device)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        if graphs is not None:
            logits = graphs.run(next_tokens, positions + i, slots)
        else:
            logits = fast.forward_cached(next_tokens[:, None], (positions + i)[:, None], slots, cache)[:, 0]
        next_tokens = logits.argmax(-1)
    sync()
    seconds = time.perf_counter() - start
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * cache.keys[0].element_size()
    read = weights + batch * kv_per_token * (prompt + steps / 2)  # the mean prefix read per step
    tok_s = batch * steps / seconds
    out = {"batch": batch, "tok_s": tok_s, "ms_per_step": seconds / steps * 1e3, "bytes_per_step": read}
    if copy:
        out["roofline_tok_s"] = batch / (read / (copy * 1e9))
        out["fraction_of_roofline"] = tok_s / out["roofline_tok_s"]
    return out


def our_rows(args, shape: str, copy: float | None, tiles: dict[int, TileConfig], result: dict, save) -> None:
    """Our variants' rows appended to result["rows"]."""
    rows = result["rows"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in args.variants:
        sparsity, bits = VARIANTS[name]
        started = time.perf_counter()
        row = {"model": name, "bits": bits or 16, "group_size": args.group_size if bits else None}
        model = fast = None
        try:
            spec = llama_spec(shape, sparsity)
            model = random_transformer(spec, dtype=DTYPE, device=device, seed=0)
            if bits is not None:
                quantize_in_place(model, bits, args.group_size)
            row["build_and_quantize_s"] = round(time.perf_counter() - started, 1)
            with quantized_tiles(tiles):
                fast = FastTransformer(model, products="auto")
                row["weight_bytes_per_step"] = step_bytes(fast)
                row["check"] = check_fast_path(model, fast, device, args.check_length)
                row["decode"] = {
                    str(b): time_decode(fast, b, args.prompt, args.steps, row["weight_bytes_per_step"], copy)
                    for b in args.batches
                }
        except Exception:
            row["error"] = traceback.format_exc()[-1500:]
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        log(json.dumps(row))
        save()
        del fast, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


# ---- gpt-fast -----------------------------------------------------------------------------


def import_gptfast(folder: Path):
    """gpt-fast's model, quantize and generate modules from `folder`. Its tokenizer module
    needs sentencepiece and tiktoken, which no step here uses: a stand-in where they are missing."""
    sys.path.insert(0, str(folder))
    try:
        import tokenizer  # noqa: F401
    except ImportError:
        sys.modules["tokenizer"] = types.SimpleNamespace(get_tokenizer=None)
    import generate
    import model
    import quantize

    return model, quantize, generate


def adapt_int4_packing(quantize) -> str | None:
    """torch >= 2.5 takes `_convert_weight_to_int4pack`'s input as uint8 (n, k / 2), two codes a
    byte, even column in the high nibble; gpt-fast's quantize.py (written before) passes int32
    (n, k). Where the op refuses that, pack first (as torchao does); the result is the same
    tinygemm layout its WeightOnlyInt4Linear reads."""
    probe = torch.randint(0, 16, (64, 1024), dtype=torch.int32, device="cuda")
    try:
        torch.ops.aten._convert_weight_to_int4pack(probe, 8)
        return None
    except Exception:  # RuntimeError in the versions seen; any refusal means the same
        pass

    def prepare_int4_weight_and_scales_and_zeros(weight_bf16, groupsize, inner_k_tiles):
        weight_int32, scales_and_zeros = quantize.group_quantize_tensor(weight_bf16, n_bit=4, groupsize=groupsize)
        packed = (weight_int32[:, ::2] << 4 | weight_int32[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles), scales_and_zeros

    quantize.prepare_int4_weight_and_scales_and_zeros = prepare_int4_weight_and_scales_and_zeros
    return "int32 codes packed to uint8 (n, k/2) for torch >= 2.5's _convert_weight_to_int4pack"


def gptfast_model(modules, model_args, mode: str, device: str):
    """gpt-fast's Transformer, random weights, quantized by its own handler (bf16, as its generate.py)."""
    model_mod, quantize, _ = modules
    with torch.device(device):
        model = model_mod.Transformer(model_args)
    model = model.to(torch.bfloat16).eval()
    handler = (
        quantize.WeightOnlyInt8QuantHandler(model)
        if mode == "int8"
        else quantize.WeightOnlyInt4QuantHandler(model, groupsize=128)
    )
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # a line per linear
        state = handler.create_quantized_state_dict()
    with torch.device("meta"):
        model = handler.convert_for_runtime()
    model.load_state_dict(state, assign=True)
    return model.to(device)


def gptfast_decode(modules, model, batch: int, prompt: int, steps: int, device: str, compile: bool) -> dict:
    """generate.py's decode: prefill (eager), then decode_one_token compiled with
    reduce-overhead (CUDA graphs), math attention, its default sampling (temperature 0.8, top-k 200)."""
    _, _, generate = modules
    sampling = {"temperature": 0.8, "top_k": 200}
    with torch.device(device):
        model.setup_caches(max_batch_size=batch, max_seq_length=prompt + steps + 16)
    decode = generate.decode_one_token
    if compile:
        decode = torch.compile(decode, mode="reduce-overhead", fullgraph=True)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, prompt), device=device)
    math = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    with torch.no_grad(), math:
        token = generate.prefill(model, tokens, torch.arange(prompt, device=device), **sampling)
        position = torch.tensor([prompt], device=device, dtype=torch.int)
        started = time.perf_counter()
        for _ in range(3):  # compiles and records the graphs
            token, _ = decode(model, token, position, **sampling)
            token = token.clone()
            position += 1
        sync()
        compile_s = time.perf_counter() - started
        start = time.perf_counter()
        for _ in range(steps):
            token, _ = decode(model, token, position, **sampling)
            token = token.clone()
            position += 1
        sync()
        seconds = time.perf_counter() - start
    return {
        "batch": batch,
        "tok_s": batch * steps / seconds,
        "ms_per_step": seconds / steps * 1e3,
        "compile_s": compile_s,
    }


def gptfast_rows(args, shape: str, result: dict, save) -> None:
    """gpt-fast's rows appended to result["rows"], its conditions in result["gptfast"]."""
    folder = ROOT / args.gptfast_dir
    info = result["gptfast"] = {"folder": str(args.gptfast_dir)}
    if not (folder / "model.py").is_file() or not (folder / "quantize.py").is_file():
        info["skipped"] = f"no gpt-fast sources in {args.gptfast_dir}/"
        return
    if (folder / "SOURCE").is_file():
        info["source"] = (folder / "SOURCE").read_text().strip()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        modules = import_gptfast(folder)
    except Exception:
        info["error"] = traceback.format_exc()[-1500:]
        return
    if args.smoke:
        model_args = modules[0].ModelArgs(
            block_size=64, vocab_size=256, n_layer=2, n_head=4, dim=256, intermediate_size=512
        )
    else:
        model_args = modules[0].ModelArgs.from_name(GPTFAST_ARGS[shape])
    info["model_args"] = {k: v for k, v in vars(model_args).items() if not isinstance(v, dict)}
    info["inductor"] = {
        "coordinate_descent_tuning": torch._inductor.config.coordinate_descent_tuning,
        "fx_graph_cache": torch._inductor.config.fx_graph_cache,
    }
    if device == "cuda":
        try:
            info["adaptation"] = adapt_int4_packing(modules[1])
        except Exception:
            info["adaptation"] = traceback.format_exc()[-800:]
    rows = result["rows"]
    for mode in args.gptfast_modes:
        if mode == "int4" and device != "cuda":
            info["int4"] = "skipped: tinygemm int4 runs on CUDA only"
            continue
        try:
            model = gptfast_model(modules, model_args, mode, device)
            row = {"model": f"gpt-fast {mode}", "dtype": "bfloat16", "decode": {}}
            for batch in args.gptfast_batches:
                steps = args.steps if not args.smoke else 2
                row["decode"][str(batch)] = gptfast_decode(
                    modules, model, batch, args.prompt, steps, device, compile=not args.smoke
                )
                log(json.dumps(row))
            rows.append(row)
        except Exception:
            rows.append({"model": f"gpt-fast {mode}", "error": traceback.format_exc()[-1500:]})
            log(rows[-1]["error"])
        save()
        model = None
        gc.collect()
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()


# ---- results ------------------------------------------------------------------------------


def target_lines(result: dict) -> list[dict]:
    tok_s = {r["model"]: r["decode"]["1"]["tok_s"] for r in result["rows"] if "1" in r.get("decode", {})}
    judged = []
    for what, top, bottom, target in TARGETS:
        entry = {"target": what, "at_least": target}
        if top not in tok_s or bottom not in tok_s:
            entry["verdict"] = f"not measured ({top if top not in tok_s else bottom} missing)"
        else:
            ratio = tok_s[top] / tok_s[bottom]
            entry["ratio"] = ratio
            entry["verdict"] = (
                "met" if ratio >= target else f"MISSED by {target - ratio:.2f}x ({ratio / target:.0%} of it)"
            )
        judged.append(entry)
    return judged


def model_lines(result: dict) -> list[str]:
    """The model rows' table and the targets."""
    batches = result["conditions"]["batches"]
    head = " | ".join(f"batch {b} tok/s (of roofline)" for b in batches)
    lines = [
        f"| model | weight GB read / step | check vs reference: prefill / decode | {head} |",
        "| --- | ---: | --- | " + " | ".join("---:" for _ in batches) + " |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['model']} | error: {r['error'].splitlines()[-1][:120]} | | "
                + " | ".join("" for _ in batches)
                + " |"
            )
            continue
        cells = []
        for b in batches:
            d = r["decode"].get(str(b))
            if d is None:
                cells.append("")
            elif "fraction_of_roofline" in d:
                cells.append(f"{d['tok_s']:.1f} ({d['fraction_of_roofline']:.0%})")
            else:
                cells.append(f"{d['tok_s']:.1f}")
        gb = f"{r['weight_bytes_per_step'] / 1e9:.2f}" if "weight_bytes_per_step" in r else "(its own)"
        check = r.get("check")
        check = f"{check['prefill_rel_error']:.1e} / {check['decode_rel_error']:.1e}" if check else ""
        lines.append(f"| {r['model']} | {gb} | {check} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (batch-1 decode, ratios in this run):", ""]
    for t in result["targets"]:
        ratio = f"{t['ratio']:.2f}x" if "ratio" in t else "-"
        lines.append(f"- {t['target']}: {ratio} (target >= {t['at_least']}x): {t['verdict']}")
    return lines


def markdown(result: dict) -> str:
    c = result["conditions"]
    lines = [f"# Quantized decode on the fast path: {c['shape']} shapes, random weights", ""]
    lines += [f"- {k}: {v}" for k, v in c.items()] + [""]
    if result["rows"]:  # none: a sweep alone
        lines += model_lines(result)
    if result.get("tiles_used"):
        lines += [
            "",
            f"Quantized decode tiles used (the sweep's best, or --quantized-tiles): {json.dumps(result['tiles_used'])}",
        ]
    if result.get("tile_sweep"):
        lines += [
            "",
            "| bits | product | tiles (block_n, inputs a step, warps, stages) | us | GB/s | of copy bw | check vs reference |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in result["tile_sweep"]:
            t = r["tiles"]
            tiles = f"{t['block_n']}, {t['block_k']}, {t['num_warps']}, {t['num_stages']}"
            if "error" in r:
                lines.append(f"| {r['bits']} | {r['product']} | {tiles} | error: {r['error'][:80]} | | | |")
            elif "us" in r:
                lines.append(
                    f"| {r['bits']} | {r['product']} | {tiles} | {r['us']:.1f} | {r['GBps']:.0f} | "
                    f"{r['fraction_of_copy_bw']:.0%} | {r['rel_error']:.1e} |"
                )
            else:
                lines.append(f"| {r['bits']} | {r['product']} | {tiles} | | | | {r['rel_error']:.1e} |")
    if result.get("gptfast"):
        lines += ["", f"gpt-fast: {json.dumps(result['gptfast'])}"]
    return "\n".join(lines) + "\n"


def bits_and_tiles(text: str) -> tuple[int, TileConfig]:
    """ "4:32,512,4,4": decode tiles (block_n, inputs a step, warps, stages) for 4-bit weights."""
    bits, _, sizes = text.partition(":")
    block_n, step, warps, stages = (int(v) for v in sizes.split(","))
    if int(bits) not in CANDIDATE_TILES:
        raise argparse.ArgumentTypeError(f"bits {bits}: 8 or 4")
    return int(bits), TileConfig(16, block_n, step, warps, stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--shape", default="llama-2-7b", choices=list(GPTFAST_ARGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--check-length", type=int, default=96)
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep; use QUANTIZED_DECODE_TILES")
    parser.add_argument(
        "--sweep-only", action="store_true", help="copy bandwidth and the tile sweep only (no models, no gpt-fast)"
    )
    parser.add_argument("--sweep-bits", nargs="+", type=int, default=[8, 4], choices=[8, 4], help="bit widths swept")
    parser.add_argument(
        "--quantized-tiles",
        nargs="+",
        type=bits_and_tiles,
        default=[],
        metavar="BITS:BLOCK_N,STEP,WARPS,STAGES",
        help="decode tiles for the model rows, e.g. 4:32,512,4,4 (over the sweep's best and QUANTIZED_DECODE_TILES)",
    )
    parser.add_argument("--gptfast-dir", default=".gptfast")
    parser.add_argument("--gptfast-modes", nargs="*", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--gptfast-batches", nargs="+", type=int, default=[1], help="each batch compiles anew")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few steps (on a CPU: Triton's interpreter)")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    shape = args.shape
    if args.smoke:
        shape = "tiny"
        args.prompt, args.steps, args.check_length = 4, 2, 9
        args.batches = [1, 2]
        args.gptfast_batches = [1]
        args.no_sweep = args.no_sweep or (not on_gpu and not args.sweep_only)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"quant_decode_{shape}"
    result = {
        "conditions": {
            "device": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter: a smoke test, no speeds)",
            "shape": shape,
            "sizes": SHAPES[shape],
            "dtype": "float16 (gpt-fast: bfloat16, as its generate.py)",
            "weights": "random N(0, 1/fan_in); quantized rows: round-to-nearest codes of them",
            "quantization": f"groups of {args.group_size} inputs; int8 symmetric, int4 asymmetric (zero points); "
            "every block matrix incl. shortcuts; embeddings and head fp16",
            "batches": args.batches,
            "prompt": args.prompt,
            "new_tokens": args.steps,
            "decode": "CUDA graphs, greedy argmax on the GPU; products 'auto' (our kernels up to 16 rows)",
            "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "rows": [],
        "targets": [],
    }

    def save() -> None:
        result["targets"] = target_lines(result)
        write_json(out_dir / f"{stem}.json", result)
        (out_dir / f"{stem}.md").write_text(markdown(result))

    copy = None
    if on_gpu:
        copy = measured_copy_gbps()
        result["conditions"]["measured_copy_GBps"] = round(copy)
        log("copy GB/s", round(copy))
    tiles: dict[int, TileConfig] = {}
    if not args.no_sweep:
        device = "cuda" if on_gpu else "cpu"
        result["tile_sweep"] = tile_sweep(SHAPES[shape], args.group_size, copy, device, args.sweep_bits)
        best = best_tiles(result["tile_sweep"])
        tiles = {bits: TileConfig(**b["tiles"]) for bits, b in best.items()}
        result["tiles_used"] = {str(bits): b for bits, b in best.items()}
        log("best tiles", json.dumps(result["tiles_used"]))
        save()
    if args.sweep_only:
        save()
        print(markdown(result))
        return
    for bits, chosen in args.quantized_tiles:
        tiles[bits] = chosen
        result.setdefault("tiles_used", {})[str(bits)] = {"tiles": chosen.__dict__, "from": "--quantized-tiles"}
    result["conditions"]["quantized_decode_tiles"] = {
        str(bits): (tiles.get(bits) or fused.QUANTIZED_DECODE_TILES[bits]).__dict__ for bits in (8, 4)
    }
    our_rows(args, shape, copy, tiles, result, save)
    if args.gptfast_modes:
        gptfast_rows(args, shape, result, save)
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
