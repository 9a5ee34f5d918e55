"""WikiText-2 perplexity of SmolLM2-135M pruned to 2:4 by SparseGPT and by magnitude, under the
conditions of benchmarks/smollm2_quality.py, added to its results (smollm2_quality.{json,md}).

Calibration (SparseGPT only): wiki.valid.raw, NSAMPLES x SEQLEN tokens, seed 42, batches of 4.
Evaluation: the first 16 windows of wiki.test.raw at 2048, and the whole test split. Runs on
the CPU; each row is written as soon as it is measured (a rerun replaces rows of the same name).

    python benchmarks/smollm2_pruning_quality.py [--data-dir DIR] [--methods sparsegpt magnitude] [--no-full-split]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers
from quality_results import merge_rows, read_results, write_results
from smollm2_quality import checkpoint_size, evaluate, slicing_conditions, wikitext2_calibration

from sliceserve.model.loader import load_model
from sliceserve.perplexity import evaluation_tokens
from sliceserve.pruning.checkpoint_writer import prune_checkpoint
from sliceserve.pruning.pattern import check_method, parse_pattern
from sliceserve.slicing.calibration import wikitext2_text
from sliceserve.slicing.sources import open_source

LABELS = {"sparsegpt": "SparseGPT", "magnitude": "magnitude"}


def nonzero_parameters(model: torch.nn.Module) -> int:
    return sum(int((t != 0).sum()) for t in model.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir")
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "magnitude"])
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--no-full-split", action="store_true", help="skip the whole test split (the long part)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    pattern = parse_pattern(args.pattern)
    for method in args.methods:
        check_method(method)

    source = open_source("smollm2-135m")
    tokenizer = source.tokenizer()
    test_tokens = evaluation_tokens(tokenizer, wikitext2_text("test", args.data_dir))
    work = Path(tempfile.mkdtemp(prefix="smollm2-pruning-"))
    results = read_results(args.out_dir)
    conditions = results["conditions"] or slicing_conditions(args, test_tokens)
    conditions["pruning"] = (
        f"{args.pattern} on every decoder linear (q, k, v, o, gate, up, down), embeddings and head dense, norms fused "
        f"first; SparseGPT with the calibration above, H in float64, 1% dampening, blocks of 128 columns; magnitude "
        f"without data; the pruned rows were measured on {time.strftime('%Y-%m-%d')} with torch {torch.__version__}, "
        f"transformers {transformers.__version__}, CPU {torch.get_num_threads()} threads"
    )
    rows = results["rows"]

    def add_row(row: dict) -> None:
        nonlocal rows
        rows = merge_rows(rows, [row])
        print(row, flush=True)
        print(write_results(args.out_dir, conditions, rows, args.windows))

    batches = None
    if "sparsegpt" in args.methods:
        batches, _ = wikitext2_calibration(tokenizer, args.nsamples, args.seqlen, args.data_dir)
    calibration = {"source": "wikitext2", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 42}
    measured = []
    for method in args.methods:
        out = work / method
        started = time.perf_counter()
        prune_checkpoint(source, out, batches, pattern=pattern, method=method, calibration=calibration, progress=False)
        seconds = time.perf_counter() - started
        model = load_model(out, verify=False)
        params, size = checkpoint_size(out)
        row = {
            "model": f"{LABELS[method]} {pattern}",
            "sparsity": None,
            "pattern": str(pattern),
            "method": method,
            "parameters": params,
            "nonzero_parameters": nonzero_parameters(model),
            "checkpoint_bytes": size,
            "slicing_seconds": round(seconds, 1),
            "ppl_16": evaluate(model, test_tokens, args.seqlen, args.windows)["ppl"],
            "ppl_full": None,
        }
        add_row(row)
        measured.append((row, model))

    # The whole split last: it costs the most, and the rows above are already written.
    for row, model in [] if args.no_full_split else measured:
        row["ppl_full"] = evaluate(model, test_tokens, args.seqlen, None)["ppl"]
        add_row(row)


if __name__ == "__main__":
    main()
