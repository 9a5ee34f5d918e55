"""Time slicing a Llama-2-7B-shaped model (random weights) on a GPU.

Measures the wall time of the whole `slice_checkpoint` call (weights generated layer by
layer on the GPU, progressive PCA, rotation, writing the safetensors checkpoint with its
sha256 index) and the peak GPU memory, for one or more activation dtypes. Then loads the
checkpoint into the runtime and checks that its logits are finite.

    python benchmarks/slice_timing.py --out-dir $OUT --compute-dtypes float32 float16
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from common import sync, versions, write_json
from transformers import LlamaConfig

from sliceserve.model.loader import load_model
from sliceserve.slicing.calibration import calibration_batches
from sliceserve.slicing.checkpoint_writer import DTYPES, slice_checkpoint
from sliceserve.slicing.sources import RandomSource

SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama-2-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=500,
        max_position_embeddings=256,
    ),
    "llama-2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}


def time_one(config, args, compute_dtype: str, work: Path) -> dict:
    source = RandomSource(config, dtype=DTYPES[args.dtype], device=args.device, seed=0)
    generator = torch.Generator().manual_seed(42)
    tokens = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen), generator=generator)
    batches = calibration_batches(tokens, None, args.batch_size)
    out = work / f"sliced-{compute_dtype}"
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    slice_checkpoint(
        source,
        out,
        batches,
        sparsity=args.sparsity,
        dtype=DTYPES[args.dtype],
        device=args.device,
        compute_dtype=DTYPES[compute_dtype],
        overwrite=True,
        progress=True,
        calibration={"source": "random tokens", "nsamples": args.nsamples, "seqlen": args.seqlen},
    )
    sync(args.device)
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
    config_json = json.loads((out / "config.json").read_text())
    bytes_on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))

    model = load_model(out, device=args.device, verify=False)
    with torch.inference_mode():
        logits = model(tokens[:1, :128].to(args.device))
    finite = bool(torch.isfinite(logits).all())
    del model, logits
    shutil.rmtree(out)
    return {
        "compute_dtype": compute_dtype,
        "wall_seconds": round(wall, 1),
        "slicing_seconds": config_json["slicing"]["seconds"],
        "peak_gpu_memory_gib": round(peak / 2**30, 2),
        "checkpoint_bytes": bytes_on_disk,
        "logits_finite": finite,
        "explained_variance_mean_output": sum(
            layer["output"] for layer in config_json["slicing"]["explained_variance"]["layers"]
        )
        / config.num_hidden_layers,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# {result['what']}",
        "",
        f"- device: {result['device']}",
        f"- versions: {result['versions']}",
        f"- date: {result['date']}",
        "",
        "| activations | wall time (s, incl. writing) | slicing (s) | peak GPU memory (GiB) | checkpoint bytes | logits finite |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['compute_dtype']} | {run['wall_seconds']} | {run['slicing_seconds']} | "
            f"{run['peak_gpu_memory_gib']} | {run['checkpoint_bytes']:,} | {run['logits_finite']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--compute-dtypes", nargs="+", default=["float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--render", help="only write the markdown table of an earlier result JSON")
    parser.add_argument("--layers", type=int, help="keep only this many layers (peak memory is per layer)")
    parser.add_argument("--work-dir", default="/tmp/slice-timing")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    if args.render:
        Path(args.render).with_suffix(".md").write_text(markdown(json.loads(Path(args.render).read_text())))
        return

    config = LlamaConfig(**SHAPES[args.shape])
    if args.layers:
        config.num_hidden_layers = args.layers
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = [time_one(config, args, dtype, work) for dtype in args.compute_dtypes]
    result = {
        "what": f"slice {args.shape} shapes ({config.num_hidden_layers} layers) (random weights) at sparsity {args.sparsity}, calibration "
        f"{args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}, checkpoint {args.dtype}",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.layers}layers" if args.layers else ""
    write_json(out_dir / f"slice_timing_{args.shape}{suffix}.json", result)
    (out_dir / f"slice_timing_{args.shape}{suffix}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
