"""WikiText-2 perplexity of SmolLM2-135M with 8- and 4-bit weights, dense and sliced 25%, under the
conditions of benchmarks/smollm2_quality.py, added to its results (smollm2_quality.{json,md}).

The dense export and the 25% slice are made as there (calibration wiki.valid.raw, 32 x 2048
tokens, seed 42); each is then quantized (`sliceserve quantize`): int8 round-to-nearest, int4
round-to-nearest and int4 GPTQ, groups of 128 inputs, every block linear (embeddings and head stay
float32, shortcut matrices too unless the row says), some after a rotation of the stream
(random orthogonal: 'rotated'; randomized Hadamard: 'Hadamard'). GPTQ's calibration: wiki.valid.raw, NSAMPLES x SEQLEN tokens,
seed 7. Evaluation: the first 16 windows of wiki.test.raw at 2048. CPU; each row is written as
soon as it is measured.

    python benchmarks/smollm2_quantization_quality.py [--data-dir DIR] [--gptq-nsamples 16 --gptq-seqlen 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from quality_results import merge_rows, read_results, write_results
from smollm2_quality import checkpoint_size, evaluate, wikitext2_calibration

from sliceserve.model.loader import load_model
from sliceserve.perplexity import evaluation_tokens
from sliceserve.quantization.checkpoint_writer import quantize_checkpoint
from sliceserve.slicing.calibration import wikitext2_text
from sliceserve.slicing.checkpoint_writer import export_checkpoint, slice_checkpoint
from sliceserve.slicing.sources import open_source

# (bits, method, shortcuts quantized too, the stream's rotation first), the comparisons first
SCHEMES = [
    (8, "rtn", False, None),
    (4, "gptq", False, None),
    (4, "gptq", False, "orthogonal"),
    (4, "rtn", False, None),
    (4, "rtn", False, "orthogonal"),
    (8, "rtn", True, None),
    (4, "gptq", True, "orthogonal"),
    (4, "gptq", False, "hadamard"),
]
ROW_WORDS = {None: "", "orthogonal": " rotated", "hadamard": " Hadamard"}  # the rows' names and folders


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--gptq-nsamples", type=int, default=16)
    parser.add_argument("--gptq-seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--work", help="reuse the dense/ and sliced-0.25/ checkpoints of an earlier run")
    args = parser.parse_args()
    source = open_source("smollm2-135m")
    tokenizer = source.tokenizer()
    test_tokens = evaluation_tokens(tokenizer, wikitext2_text("test", args.data_dir))
    work = Path(args.work or tempfile.mkdtemp(prefix="smollm2-quantization-"))
    print("work folder:", work, flush=True)
    results = read_results(args.out_dir)
    conditions, rows = results["conditions"], results["rows"]
    conditions["quantization"] = (
        f"groups of {args.group_size} inputs on every decoder linear (q, k, v, o, gate, up, down); int8 symmetric, "
        f"int4 asymmetric with zero points; embeddings and head float32, shortcut matrices too unless the row says "
        f"(then round-to-nearest in the row's bits); GPTQ with H in float64 "
        f"from wiki.valid.raw, {args.gptq_nsamples} x {args.gptq_seqlen} tokens (seed 7), 1% dampening, blocks of "
        f"128 columns; 'rotated': the stream first turned by random orthogonal matrices, 'Hadamard': by randomized "
        f"Hadamard ones as QuaRot's (seed 0 for both); measured on {time.strftime('%Y-%m-%d')} with torch "
        f"{torch.__version__}, CPU {torch.get_num_threads()} threads"
    )

    def add_row(row: dict) -> None:
        nonlocal rows
        rows = merge_rows(rows, [row])
        print(row, flush=True)
        write_results(args.out_dir, conditions, rows, args.windows)

    bases = {"dense": work / "dense", "SliceGPT 25%": work / "sliced-0.25"}
    if not (bases["dense"] / "config.json").exists():
        export_checkpoint(source, bases["dense"], progress=False)
    if not (bases["SliceGPT 25%"] / "config.json").exists():
        batches, _ = wikitext2_calibration(tokenizer, 32, 2048, args.data_dir, batch_size=8)
        slice_checkpoint(source, bases["SliceGPT 25%"], batches, sparsity=0.25, progress=False)
    gptq_batches, calibration = wikitext2_calibration(
        tokenizer, args.gptq_nsamples, args.gptq_seqlen, args.data_dir, seed=7
    )
    done = {row["model"] for row in rows}
    for bits, method, shortcuts, rotate in SCHEMES:
        for label, base in bases.items():
            parameters, _ = checkpoint_size(base)
            if shortcuts and label == "dense":
                continue  # a dense model has no shortcut matrices
            name = f"{label} + int{bits} {method.upper()} g{args.group_size}" + ROW_WORDS[rotate]
            name += " (shortcuts too)" if shortcuts else ""
            if name in done:
                continue
            out = (
                work
                / f"{base.name}-int{bits}-{method}{ROW_WORDS[rotate].replace(' ', '-')}{'-shortcuts' if shortcuts else ''}"
            )
            started, reused = time.perf_counter(), (out / "config.json").exists()
            if not reused:
                quantize_checkpoint(
                    base, out, bits=bits, group_size=args.group_size, method=method, shortcuts=shortcuts, rotate=rotate,
                    batches=gptq_batches if method == "gptq" else None, calibration=calibration, progress=False,
                )  # fmt: skip
            seconds = time.perf_counter() - started
            _, size = checkpoint_size(out)
            row = {
                "model": name,
                "sparsity": 0.25 if "25" in label else 0.0,
                "parameters": parameters,
                "checkpoint_bytes": size,
                "slicing_seconds": None if reused else round(seconds, 1),  # reused: timed by an earlier run
                "ppl_16": evaluate(load_model(out, verify=False), test_tokens, args.seqlen, args.windows)["ppl"],
                "ppl_full": None,
            }
            add_row(row)


if __name__ == "__main__":
    main()
