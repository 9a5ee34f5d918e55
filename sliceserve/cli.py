"""The `sliceserve` command: slice, export, prune, quantize, finetune, ppl, eval, info, plan, serve, generate, demo."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

from sliceserve.commands.options import (
    add_calibration_options,
    add_demo_options,
    add_engine_options,
    add_eval_options,
    add_finetune_options,
    add_output_options,
    add_plan_options,
    add_quantize_options,
    add_server_options,
)
from sliceserve.errors import INTERRUPTED, SliceserveError

log = logging.getLogger("sliceserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sliceserve", description="Slice language models with SliceGPT and run them.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("slice", help="slice a model and write a compact checkpoint")
    p.add_argument("model", help="Hugging Face folder, .gguf file, or smollm2-135m")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of the residual width to delete, in [0, 1)")
    p.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this (default 8)")
    p.add_argument(
        "--compute-dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="activations while slicing (default float32; float64 for float64 checkpoints); PCA is always float64",
    )
    add_output_options(p)
    add_calibration_options(p)

    p = sub.add_parser("export", help="write the dense model in the checkpoint format (no rotation)")
    p.add_argument(
        "model",
        help="Hugging Face folder, .gguf file, smollm2-135m, or random:SHAPE "
        "(random weights of llama-2-7b, llama-2-13b, llama-2-70b or tiny)",
    )
    add_output_options(p)
    group = p.add_argument_group("random:SHAPE only", "(its --dtype defaults to float16)")
    group.add_argument("--tokenizer", help="saved Hugging Face tokenizer folder to copy into the checkpoint")
    group.add_argument(
        "--sparsity", type=float, help="kept widths as slicing at this sparsity gives (default 0: dense)"
    )
    group.add_argument("--seed", type=int, help="seed of the random weights (default 0)")

    p = sub.add_parser("prune", help="prune every decoder linear to an N:M sparsity pattern (SparseGPT or magnitude)")
    p.add_argument("model", help="Hugging Face folder, .gguf file, or smollm2-135m")
    p.add_argument("--pattern", default="2:4", help="N:M: at most N non-zeros in each group of M inputs (default 2:4)")
    p.add_argument(
        "--method", default="sparsegpt", help="sparsegpt (calibrated, default) or magnitude (no data needed)"
    )
    p.add_argument(
        "--compute-dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="activations while pruning (default float32; float64 for float64 checkpoints); H is always float64",
    )
    add_output_options(p)
    add_calibration_options(p)

    p = sub.add_parser("quantize", help="8- or 4-bit block linears (round to nearest or GPTQ) in a new checkpoint")
    add_quantize_options(p)

    p = sub.add_parser("finetune", help="recovery fine-tuning: LoRA (PEFT) on a checkpoint, merged into a new one")
    add_finetune_options(p)

    p = sub.add_parser("ppl", help="WikiText-2 perplexity of a checkpoint or of a model")
    p.add_argument("path", help="checkpoint folder, or a model (Hugging Face folder, .gguf, smollm2-135m)")
    p.add_argument("--data", default="wikitext2", help="wikitext2 (test split) or text file(s), comma-separated")
    p.add_argument("--data-dir", help="folder holding wikitext-2-raw/ (else $SLICESERVE_DATA_DIR, else ../shared/data)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per scored window (default 2048)")
    p.add_argument("--max-windows", type=int, help="score at most this many windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], help="run in this dtype")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")

    p = sub.add_parser("eval", help="zero-shot tasks of lm-evaluation-harness (piqa, arc_easy, ...) on a checkpoint")
    add_eval_options(p)

    p = sub.add_parser("plan", help="cards needed for a model, dense and sliced, with the layers of each card")
    add_plan_options(p)

    p = sub.add_parser("info", help="widths, parameters, bytes and provenance of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="serve a checkpoint (dense or sliced) over an OpenAI-style HTTP API")
    p.add_argument("path", help="checkpoint folder")
    add_server_options(p)

    p = sub.add_parser("demo", help="slice SmolLM2-135M once (cached) and serve it on 127.0.0.1:8000")
    add_demo_options(p)

    p = sub.add_parser("generate", help="generate text from a prompt with a checkpoint")
    p.add_argument("path", help="checkpoint folder")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    add_engine_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm(), sigterm_interrupts():
            return COMMANDS[args.command](args)
    except SliceserveError as error:
        print(f"sliceserve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sliceserve: interrupted (nothing was left half-written)", file=sys.stderr)
        return 130
    except MemoryError:
        print("sliceserve: error: out of memory", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "out of memory" in str(error):
            print(f"sliceserve: error: out of memory on {getattr(args, 'device', 'cpu')}", file=sys.stderr)
            return 2
        raise


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds as Ctrl-C does (KeyboardInterrupt), so that a command stopped by `kill`
    or a supervisor removes what it had half-written, as the checkpoint writers do on Ctrl-C;
    `serve` replaces it by its drain while serving (server/shutdown.py)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        INTERRUPTED.set()  # for the readers that would report the interrupted read as an error
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        INTERRUPTED.clear()


def run_slice(args: argparse.Namespace) -> int:
    from sliceserve.commands.slicing import slice_command

    return slice_command(args)


def run_export(args: argparse.Namespace) -> int:
    from sliceserve.commands.slicing import export_command

    return export_command(args)


def run_quantize(args: argparse.Namespace) -> int:
    from sliceserve.commands.quantizing import quantize_command

    return quantize_command(args)


def run_prune(args: argparse.Namespace) -> int:
    from sliceserve.commands.pruning import prune_command

    return prune_command(args)


def run_finetune(args: argparse.Namespace) -> int:
    from sliceserve.commands.finetuning import finetune_command

    return finetune_command(args)


def run_ppl(args: argparse.Namespace) -> int:
    from sliceserve.commands.evaluation import ppl_command

    return ppl_command(args)


def run_eval(args: argparse.Namespace) -> int:
    from sliceserve.commands.harness import eval_command

    return eval_command(args)


def run_plan(args: argparse.Namespace) -> int:
    from sliceserve.commands.planning import plan_command

    return plan_command(args)


def run_info(args: argparse.Namespace) -> int:
    from sliceserve.commands.evaluation import info_command

    return info_command(args)


def run_serving(args: argparse.Namespace) -> int:
    from sliceserve.commands import serving

    return {"serve": serving.serve_command, "demo": serving.demo_command, "generate": serving.generate_command}[
        args.command
    ](args)


COMMANDS = {
    "slice": run_slice,
    "export": run_export,
    "prune": run_prune,
    "quantize": run_quantize,
    "finetune": run_finetune,
    "ppl": run_ppl,
    "eval": run_eval,
    "info": run_info,
    "plan": run_plan,
    "serve": run_serving,
    "demo": run_serving,
    "generate": run_serving,
}
