"""WikiText-2 perplexity of SmolLM2-135M sliced and then recovered by fine-tuning (RFT), added to
the results of benchmarks/smollm2_quality.py (smollm2_quality.{json,md}).

Two kinds of rows:

- "SliceGPT S + RFT": sliced as smollm2_quality.py slices (wiki.valid.raw, 32 x 2048 tokens,
  seed 42), then LoRA fine-tuned (`sliceserve finetune`'s code) on WikiText-2 *train* text:
  wiki.train.head.raw (the split's first 67,737 tokens, the part CI has), rows joined with
  "\\n\\n" as the test split is read, NSTEPS x BATCH windows of SEQLEN at seeded random starts.
  The test split is never trained on.
- "demo pipeline S (+ N distillation steps)": the checkpoint `sliceserve demo --sparsity S
  --recover-steps N` makes (calibration text sampled from the model itself, distillation to the
  dense model on that text, no data set; bfloat16 weights), evaluated in float32 activations.

Evaluation as smollm2_quality.py: wiki.test.raw at 2048, the first 16 windows and the whole split,
scored window by window in one pass (the first 2 windows, the demo's own measure, come with it).
CPU; each row is written as soon as it is measured, with the machine's load average.

    python benchmarks/smollm2_rft_quality.py --sparsities 0.25 0.3 [--steps 64 --rank 16 --lr 2e-4 --seqlen 512 --batch-size 2]
    python benchmarks/smollm2_rft_quality.py --demo 0.1 --recover-steps 0      # the demo's pipeline
    python benchmarks/smollm2_rft_quality.py --sparsities 0.25 --work /tmp/w   # reuse /tmp/w/sliced-0.25
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import versions
from quality_results import merge_rows, read_results, write_results
from smollm2_quality import checkpoint_size, wikitext2_calibration

from sliceserve.checkpoint import read_config
from sliceserve.finetuning.lora import LoraSettings, finetune_checkpoint
from sliceserve.model.loader import load_model
from sliceserve.perplexity import evaluation_tokens, perplexity
from sliceserve.slicing.calibration import (
    calibration_batches,
    find_wikitext2,
    token_windows,
    wikitext2_text,
)
from sliceserve.slicing.checkpoint_writer import slice_checkpoint
from sliceserve.slicing.sources import open_source

TRAIN_FILE = "wiki.train.head.raw"


def train_text(data_dir: str | None) -> str:
    """The train head read as wikitext2_text reads a split: lines, blank ones empty, joined with "\\n\\n"."""
    with open(find_wikitext2(data_dir) / TRAIN_FILE, encoding="utf-8") as f:
        return "\n\n".join(line if line.strip() else "" for line in f)


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


@torch.inference_mode()
def window_perplexities(model, tokens: torch.Tensor, seqlen: int, firsts: tuple[int, ...], windows: int | None, found):
    """Fills `found` with "ppl_N", the perplexity of the first N windows, for each N in `firsts`
    (calling found_one() after each), then "ppl_full" over `windows` (None: all): one pass."""
    total = tokens.numel() // seqlen if windows is None else min(windows, tokens.numel() // seqlen)
    nll, scored = 0.0, 0
    for w in range(total):
        result = perplexity(model, tokens[w * seqlen : (w + 1) * seqlen], seqlen=seqlen, progress=False)
        nll += math.log(result["ppl"]) * result["tokens"]
        scored += result["tokens"]
        if w + 1 in firsts:
            found(f"ppl_{w + 1}", math.exp(nll / scored))
    if windows is None:
        found("ppl_full", math.exp(nll / scored))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir")
    parser.add_argument("--sparsities", type=float, nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per training sequence")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step")
    parser.add_argument("--no-shortcuts", action="store_true", help="adapters only; the shortcut matrices stay")
    parser.add_argument("--demo", type=float, nargs="*", default=[], help="sparsities of the demo's pipeline rows")
    parser.add_argument("--recover-steps", type=int, default=0, help="the demo rows' distillation steps")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--no-full-split", dest="full_split", action="store_false", help="the first windows only")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--work", help="folder of the checkpoints; sliced-S/ there is reused")
    args = parser.parse_args()

    source = open_source("smollm2-135m")
    tokenizer = source.tokenizer()
    test_tokens = evaluation_tokens(tokenizer, wikitext2_text("test", args.data_dir))
    work = Path(args.work or tempfile.mkdtemp(prefix="smollm2-rft-"))
    print("work folder:", work, flush=True)
    conditions, ours = {}, []  # what this run adds
    from importlib.metadata import version

    conditions["recovery fine-tuning"] = (
        f"LoRA (PEFT {version('peft')}) on every block linear, the shortcut matrices trained whole unless the row "
        f"says; alpha = 2 x rank, AdamW, constant lr, float32; the 'SliceGPT S + RFT' rows train on "
        f"{TRAIN_FILE} (WikiText-2 train, its first 67,737 tokens), never on test; the 'demo pipeline' rows are "
        f"`sliceserve demo`'s checkpoints (32 x 256 tokens generated by the model, seed 42; distillation to the dense "
        f"model on that text: rank 8, lr 1e-3, 4 sequences a step; bfloat16 weights, scored in float32); "
        f"fine-tuning seconds measured on {time.strftime('%Y-%m-%d')}, CPU ({platform.machine()}, "
        f"{torch.get_num_threads()} threads) shared with other jobs (the row gives the load average), torch "
        f"{torch.__version__}, transformers {versions()['transformers']}"
    )

    def add_row(row: dict) -> None:
        """Merged into the file as it is now: runs of this script for other rows may be writing it too."""
        ours[:] = merge_rows(ours, [row])
        print(row, flush=True)
        results = read_results(args.out_dir)
        write_results(args.out_dir, results["conditions"] | conditions, merge_rows(results["rows"], ours), args.windows)

    def score(path: Path, row: dict) -> None:
        """The row's perplexities, the row written after each (the whole split takes the longest)."""
        model = load_model(path, verify=False, dtype=torch.float32)

        def found(key: str, ppl: float) -> None:
            row["ppl_16" if key == f"ppl_{args.windows}" else key] = ppl
            if "ppl_16" in row:
                add_row(row)

        row.setdefault("ppl_full", None)
        window_perplexities(
            model, test_tokens, args.eval_seqlen, (2, args.windows), None if args.full_split else args.windows, found
        )

    calibration = None
    for sparsity in args.sparsities:
        sliced = work / f"sliced-{sparsity}"
        if not (sliced / "config.json").exists():
            if calibration is None:  # (batches, their record), read once for every sparsity
                calibration = wikitext2_calibration(tokenizer, 32, 2048, args.data_dir)
            text, meta = calibration
            slice_checkpoint(source, sliced, text, sparsity=sparsity, progress=False, calibration=meta)
        ids = torch.tensor(tokenizer(train_text(args.data_dir), add_special_tokens=False)["input_ids"])
        nsamples = args.steps * args.batch_size  # each window used once
        batches = calibration_batches(token_windows(ids, nsamples, args.seqlen, seed=0), None, args.batch_size)
        settings = LoraSettings(
            rank=args.rank,
            alpha=2.0 * args.rank,
            steps=args.steps,
            learning_rate=args.lr,
            train_shortcuts=not args.no_shortcuts,
        )
        out = work / f"sliced-{sparsity}-rft"
        load_before = load_average()
        started = time.perf_counter()
        data = {"source": TRAIN_FILE, "nsamples": nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size}
        finetune_checkpoint(sliced, out, batches, settings, data=data, overwrite=True, progress=True)
        seconds = time.perf_counter() - started
        parameters, size = checkpoint_size(out)
        shortcuts = "" if settings.train_shortcuts else ", adapters only"
        row = {
            "model": f"SliceGPT {sparsity:.0%} + RFT (LoRA r{args.rank}, {args.steps} x {args.batch_size} x "
            f"{args.seqlen} train tokens{shortcuts})",
            "sparsity": sparsity,
            "parameters": parameters,
            "checkpoint_bytes": size,
            "slicing_seconds": None,
            "finetuning_seconds": round(seconds, 1),
            "finetuning": {
                "data": data,
                "steps": args.steps,
                "rank": args.rank,
                "alpha": 2.0 * args.rank,
                "lr": args.lr,
                "seqlen": args.seqlen,
                "batch_size": args.batch_size,
                "train_shortcuts": settings.train_shortcuts,
                "load_average_before_after": [load_before, load_average()],
            },
        }
        score(out, row)

    if args.demo:
        from sliceserve.commands.serving import DEMO_MODEL, demo_cache_dir, demo_checkpoint_name, make_demo_checkpoint

        for sparsity in args.demo:
            # the demo's own cache ($SLICESERVE_CACHE): a checkpoint the demo made is scored as it is
            out = demo_cache_dir() / demo_checkpoint_name(DEMO_MODEL, sparsity, args.recover_steps)
            load_before, made_now = load_average(), not (out / "config.json").exists()
            if made_now:
                make_demo_checkpoint(
                    source,
                    DEMO_MODEL,
                    out,
                    sparsity=sparsity,
                    nsamples=32,
                    seqlen=256,
                    recover_steps=args.recover_steps,
                )
            config = read_config(out)
            parameters, size = checkpoint_size(out)
            steps = f" + {args.recover_steps} distillation steps" if args.recover_steps else ""
            row = {
                "model": f"demo pipeline {sparsity:.0%}{steps} (generated calibration, bfloat16)",
                "sparsity": sparsity,
                "parameters": parameters,
                "checkpoint_bytes": size,
                # as the checkpoint records them; sampling the text (once per model, cached) is not included
                "slicing_seconds": config["slicing"]["seconds"],
                "finetuning_seconds": config.get("finetuning", {}).get("seconds"),
                "finetuning": {
                    "objective": "distillation" if args.recover_steps else None,
                    "recover_steps": args.recover_steps,
                    "created": config["created"],
                    **({"load_average_before_after": [load_before, load_average()]} if made_now else {}),
                },
            }
            score(out, row)


if __name__ == "__main__":
    main()
