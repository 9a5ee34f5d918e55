"""Where a serving step's time goes: prefill chunks, a decode graph, and the products alone.

Builds the fast path over random weights of a real shape and times, on the GPU:
  - a prefill step of `--chunks` fresh prompts of `--chunk` tokens each (what the engine's
    token budget packs into one step), wall time with the GPU synchronised;
  - the same tokens as one prompt;
  - the decode graph at `--batch` rows;
  - the step's matrix products alone (the library's, same shapes, no attention): the ceiling;
and writes a torch.profiler table of the packed prefill step (top kernels by GPU time, top
operators by host time) so the gap between the step and its products is named.

    python benchmarks/profile_step.py --out-dir $OUT [--shape llama-2-7b] [--sparsity 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import sync, versions, write_json  # noqa: E402
from random_models import llama_spec, random_transformer  # noqa: E402

from sliceserve.fast.model import FastTransformer  # noqa: E402
from sliceserve.model.kv_cache import PrefillChunk  # noqa: E402


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of `fn` over `repeats` calls after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def products_only(model: FastTransformer, rows: int) -> float:
    """Seconds of one step's library matrix products (every layer's, then the head's last rows)."""
    x = torch.randn(rows, model.layers[0].qkv_weight.shape[1], device="cuda", dtype=model.dtype)

    def run():
        for layer in model.layers:
            F.linear(x, layer.qkv_weight)
            attn = x.new_empty(rows, layer.o_weight.shape[1])
            mid = F.linear(attn, layer.o_weight)
            if layer.attn_shortcut is not None:
                mid = torch.addmm(mid, x, layer.attn_shortcut)
            F.linear(x, layer.gate_weight)
            act = F.linear(x, layer.up_weight)
            out = F.linear(act, layer.down_weight)
            if layer.mlp_shortcut is not None:
                torch.addmm(out, x, layer.mlp_shortcut)

    return timed(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-2-7b")
    parser.add_argument("--sparsity", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    spec = llama_spec(args.shape, args.sparsity)
    model = FastTransformer(random_transformer(spec, dtype=torch.float16), products="auto")
    slots = max(args.chunks, args.batch)
    cache = model.new_cache(slots=slots, max_len=1024)
    paged = model.new_cache(slots=slots, max_len=1024, blocks=slots * 64 + 1)
    blocks = torch.randperm(slots * 64, generator=torch.Generator().manual_seed(1)) + 1
    paged.assign_blocks([(s, i, int(blocks[s * 64 + i])) for s in range(slots) for i in range(64)])
    vocab = spec.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.chunk,), generator=g).tolist() for _ in range(args.chunks)]
    packed = [PrefillChunk(p, 0, slot) for slot, p in enumerate(prompts)]
    whole = [PrefillChunk([t for p in prompts for t in p][: min(1024, args.chunk * args.chunks)], 0, 0)]
    result = {
        "shape": args.shape,
        "sparsity": args.sparsity,
        "dtype": "float16",
        "device": torch.cuda.get_device_name(),
    }
    result["versions"] = versions()
    reserved_logits, paged_logits = model.prefill(packed, cache), model.prefill(packed, paged)
    result["paged_equals_reserved_prefill"] = bool(torch.equal(reserved_logits, paged_logits))
    rows = torch.arange(args.chunks, device="cuda")
    step = lambda c: model.step(reserved_logits.argmax(-1), rows * 0 + args.chunk, rows, c, splits=4)  # noqa: E731
    result["paged_equals_reserved_decode"] = bool(torch.equal(step(cache), step(paged)))
    rows = args.chunk * args.chunks
    result["packed_prefill_ms"] = 1e3 * timed(lambda: model.prefill(packed, cache))
    result["packed_prefill_paged_ms"] = 1e3 * timed(lambda: model.prefill(packed, paged))
    result["one_prompt_prefill_ms"] = 1e3 * timed(lambda: model.prefill(whole, cache))
    result["products_only_ms"] = 1e3 * products_only(model, rows)
    model.prepare(cache)
    tokens = torch.zeros(args.batch, dtype=torch.long, device="cuda")
    positions = torch.full((args.batch,), 300, device="cuda")
    decode_slots = torch.arange(args.batch, device="cuda")
    graphs = model.decode_graphs(cache)
    result["decode_graph_ms"] = 1e3 * timed(lambda: graphs.run(tokens, positions, decode_slots), repeats=20)
    model.graphs = None
    model.prepare(paged)
    graphs = model.decode_graphs(paged)
    result["decode_graph_paged_ms"] = 1e3 * timed(lambda: graphs.run(tokens, positions, decode_slots), repeats=20)
    short = [PrefillChunk(p[:32], 0, slot) for slot, p in enumerate(prompts * (64 // len(prompts)))]
    result["short_prefill_64x32_ms"] = 1e3 * timed(lambda: model.prefill(short, paged))
    decode_rows = [PrefillChunk([1], 300, slot) for slot in range(args.batch)]
    mixed = packed + decode_rows
    result["mixed_prefill_plus_decode_folded_ms"] = 1e3 * timed(lambda: model.prefill(mixed, paged))

    def separate():
        model.prefill(packed, paged)
        graphs.run(tokens, positions, decode_slots)

    result["mixed_prefill_then_decode_graph_ms"] = 1e3 * timed(separate)

    from sliceserve.kernels.prefill_attention import attention_tiles, prefill_attention, prefill_attention_reference

    heads, head_dim = spec.num_heads, spec.head_dim
    q = torch.randn(rows, heads, head_dim, device="cuda", dtype=model.dtype)
    segments = [(i * args.chunk, (i + 1) * args.chunk, i, 0) for i in range(args.chunks)]
    tiles = attention_tiles(segments, 64, "cuda")
    keys, values = paged.keys[0], paged.values[0]
    got = prefill_attention(q, keys, values, paged.block_table, tiles)
    want = prefill_attention_reference(q, keys, values, paged.block_table, segments)
    result["prefill_attention_max_abs_error"] = float((got.float() - want.float()).abs().max())
    result["prefill_attention_ms"] = 1e3 * timed(lambda: prefill_attention(q, keys, values, paged.block_table, tiles))

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.prefill(packed, paged)
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    (args.out_dir / "profile_packed_prefill.txt").write_text(table + "\n\n" + host)
    write_json(args.out_dir / "profile_step.json", result)
    print(result)
    print(table)
    print(host)


if __name__ == "__main__":
    main()
