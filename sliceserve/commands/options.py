"""Every subcommand's options, in a module that imports nothing heavy: building the parser (and
`--help`) must not load torch, which takes seconds."""

from __future__ import annotations

import argparse
import os

from sliceserve.planning.memory import DEFAULT_STEP_TOKENS, DTYPE_BYTES


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument(
        "--calibration",
        default="wikitext2",
        help="wikitext2 (valid split), generated (sampled from the model), or text file(s)/folder, comma-separated",
    )
    group.add_argument(
        "--data-dir", help="folder holding wikitext-2-raw/ (else $SLICESERVE_DATA_DIR, else ../shared/data)"
    )
    group.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    group.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence (default 2048)")
    group.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass while slicing")
    group.add_argument("--seed", type=int, default=42)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="weights dtype of the checkpoint (default: the source model's)",
    )
    parser.add_argument("--device", default="cpu", help="where the maths runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def add_finetune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (sliced, dense or pruned)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument(
        "--data",
        default="wikitext2",
        help="wikitext2 (valid split), generated (sampled from the checkpoint), or text file(s)/folder, comma-separated",
    )
    parser.add_argument(
        "--data-dir", help="folder holding wikitext-2-raw/ (else $SLICESERVE_DATA_DIR, else ../shared/data)"
    )
    parser.add_argument("--nsamples", type=int, default=128, help="training sequences (default 128)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per training sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument(
        "--steps", type=int, default=100, help="optimizer steps, cycling over the batches (default 100)"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    parser.add_argument("--train-shortcuts", action="store_true", help="train the shortcut matrices too (whole)")
    parser.add_argument(
        "--distill-from",
        metavar="DENSE",
        help="distillation: train to match this model's next-token distribution (KL to its softmax) instead of "
        "predicting the text; a dense checkpoint, Hugging Face folder, .gguf file or smollm2-135m, sharing the "
        "checkpoint's tokenizer. --data generated then samples the text from it: no data set needed",
    )
    parser.add_argument(
        "--lm-weight",
        type=float,
        default=0.0,
        help="with --distill-from: loss = (1 - W) KL + W language-model loss (default 0: KL only)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="weights dtype of the result (default: the checkpoint's)",
    )
    parser.add_argument("--device", default="cpu", help="where training runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


# Measured on the demo's own pipeline (generated calibration; WikiText-2 test, first 2 windows of
# 2048; dense 18.84; README): 10% 62.50, answering "What is the capital of France?" with "The capital
# of France is Paris."; 15% 87.21 (74.36 after 8 distillation steps, 384 s more; both name Paris,
# then ramble), 20% 136.19 and 25% 193.09 (137.28 after 8 steps), both wrong.
DEMO_SPARSITY = 0.1
DEMO_RECOVER_STEPS = 0


def add_demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sparsity",
        type=float,
        default=DEMO_SPARSITY,
        help=f"fraction of the width to slice away (default {DEMO_SPARSITY}: on this 135M model the most of those "
        "measured that still answers plainly; see README)",
    )
    parser.add_argument("--nsamples", type=int, default=32, help="generated calibration sequences")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per generated calibration sequence")
    parser.add_argument(
        "--recover-steps",
        type=int,
        default=DEMO_RECOVER_STEPS,
        help="after slicing, distil the slice towards the dense model for N LoRA steps of 4 sequences on the same "
        "generated text (default 0: 8 steps took 266 s on this project's 2-core CPU, most of another first run, "
        "and lower 25%%'s perplexity by 29%%; see README)",
    )
    add_server_options(parser)


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a Hugging Face config.json, a sliceserve checkpoint's, or a folder holding one")
    parser.add_argument("--gpu-memory", required=True, help="memory of one card, as 24GiB, 40GB or 24000MiB")
    parser.add_argument(
        "--sparsity",
        type=float,
        help="slicing fraction of the sliced plan (default 0.25; a sliced checkpoint uses its own widths)",
    )
    parser.add_argument(
        "--round-to", type=int, default=8, help="kept widths are multiples of this, as `slice` (default 8)"
    )
    parser.add_argument("--batch", type=int, default=1, help="requests decoded together: KV-cache slots (default 1)")
    parser.add_argument(
        "--context", type=int, help="positions each request may use (default: the model's full context)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=DEFAULT_STEP_TOKENS,
        metavar="N",
        help=f"tokens one engine step carries, as `serve` takes it: the prefill's activations (default "
        f"{DEFAULT_STEP_TOKENS})",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_BYTES), help="weights and KV dtype (default float16, or the checkpoint's)"
    )
    parser.add_argument(
        "--reserve",
        default="1GiB",
        help="per card, for the CUDA context, library workspaces and allocator slack (default 1GiB)",
    )
    parser.add_argument(
        "--bits", type=int, choices=[8, 4], help="plan the block linears in 8 or 4 bits (sliceserve quantize)"
    )
    parser.add_argument("--group-size", type=int, default=128, help="inputs per quantization scale (default 128)")
    parser.add_argument(
        "--quantized-shortcuts", action="store_true", help="with --bits: the shortcut matrices quantized too"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def add_quantize_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder of ours: dense export, sliced or 2:4")
    parser.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8 (symmetric) or 4 (with zero points)")
    parser.add_argument("--group-size", type=int, default=128, help="inputs sharing one scale (default 128)")
    parser.add_argument(
        "--method", choices=["rtn", "gptq"], default="rtn", help="rtn: round to nearest, no data (default); "
        "gptq: error feedback from calibration text (the calibration options)",
    )  # fmt: skip
    parser.add_argument("--shortcuts", action="store_true", help="quantize a sliced model's shortcut matrices too")
    rotation = parser.add_mutually_exclusive_group()
    rotation.add_argument(
        "--rotate", action="store_true", help="first rotate the residual stream by random orthogonal matrices "
        "(the same model; its weights quantize with less error)",
    )  # fmt: skip
    rotation.add_argument(
        "--hadamard", action="store_true", help="first rotate the residual stream by randomized Hadamard "
        "matrices, as QuaRot does (widths such as 4096, 5120, 576 and their 25%% slices have one)",
    )  # fmt: skip
    parser.add_argument("--rotation-seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_calibration_options(parser)


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("placement")
    group.add_argument(
        "--gpus", type=int, help="pipeline stages over the first N GPUs (cuda:0 .. cuda:N-1), one process"
    )
    group.add_argument("--devices", help="pipeline stages over these devices, one process (as cuda:0,cuda:1)")
    group.add_argument(
        "--gpu-memory", help="memory each card may use, as 24GiB: caps PyTorch's allocator and sizes the stages"
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="one stage per process, launched by torchrun; rank 0 runs the engine (and the HTTP server)",
    )
    group.add_argument(
        "--micro-batches",
        type=int,
        help="with --distributed: pieces a decode batch is cut into (default: the number of stages)",
    )


PAPER_TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande"  # SliceGPT's zero-shot tasks


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder, or a model (Hugging Face folder, .gguf, smollm2-135m)")
    parser.add_argument(
        "--tasks",
        default=PAPER_TASKS,
        help=f"lm-eval task names, comma-separated (default: the paper's, {PAPER_TASKS})",
    )
    parser.add_argument(
        "--include-path", metavar="DIR", help="folder of task YAML files of your own, besides lm-eval's"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], help="run in this dtype")
    parser.add_argument(
        "--runtime",
        choices=["auto", "fast", "reference"],
        default="auto",
        help="for a checkpoint: fast (Triton kernels, CUDA only), reference (plain PyTorch), auto (default): fast on CUDA",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="requests scored per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, help="tokens per forward pass (default: the model's positions)")
    parser.add_argument("--limit", type=float, help="at most N documents per task (below 1: that fraction)")
    parser.add_argument("--out", metavar="FILE", help="write lm-eval's results as JSON")
    parser.add_argument("--log-samples", action="store_true", help="with --out: every document's requests and scores")
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100_000,
        help="resamples for the standard errors (default 100000; 0: none)",
    )


DEFAULT_MAX_MODEL_LEN = 2048  # longest request by default


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=DEFAULT_MAX_MODEL_LEN,
        help=f"longest prompt + completion, in tokens (default {DEFAULT_MAX_MODEL_LEN}, capped by the model)",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache slots)")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        metavar="N",
        help="tokens one engine step may carry: every running request's next token plus prompt chunks of waiting "
        "ones (default: max(4096, 256 + --max-batch)); larger steps prefill a burst of prompts in fewer, more "
        "efficient products, smaller ones keep the running streams' inter-token latency down",
    )
    parser.add_argument(
        "--max-tokens-while-decoding",
        type=int,
        metavar="N",
        help="tokens one step may carry while any request decodes (default and at most: --max-num-batched-tokens); "
        "a few hundred spread a burst's prompts over the running streams' steps: first tokens come sooner, "
        "at a cost in throughput (measured in benchmarks/results/serve_gpu_h200.md)",
    )
    parser.add_argument(
        "--kv-cache-memory",
        metavar="SIZE",
        help="memory of the paged KV cache, e.g. 40GiB: requests share its blocks of 16 positions as they grow, "
        "wait for them when it is full, and are preempted (to recompute) when it runs out. Default: enough for "
        "--max-batch requests of --max-model-len tokens, as far as the GPU has room",
    )
    parser.add_argument(
        "--runtime",
        choices=["auto", "fast", "reference"],
        default="auto",
        help="fast: Triton kernels + CUDA graphs (CUDA only); reference: plain PyTorch; "
        "auto (default): fast on CUDA, reference elsewhere",
    )
    add_placement_options(parser)


def add_server_options(parser: argparse.ArgumentParser) -> None:
    add_engine_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SLICESERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default $SLICESERVE_API_KEY)",
    )
    parser.add_argument(
        "--allowed-hosts",
        default="",
        metavar="NAMES",
        help="without an API key, Host names accepted besides IP addresses, localhost and --host: "
        "comma-separated, '*' for any (against DNS rebinding; default none)",
    )
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which 429 is answered")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="open connections (or running requests) beyond which new requests get 503 (default 1024)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="on SIGTERM or Ctrl-C: seconds the running requests get to finish, while new ones get 503; "
        "then they end with an error event (default 5)",
    )
    parser.add_argument("--model-name", help="the model id clients name (default: the folder name)")
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine loop in a process of its own, so that the HTTP work does not compete with it for "
        "Python's interpreter lock (default: on). --distributed and stages over several devices (--gpus, "
        "--devices) keep it in the server's process",
    )
