"""`sliceserve serve`, `sliceserve generate` and `sliceserve demo`."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

from sliceserve.commands.options import DEMO_RECOVER_STEPS
from sliceserve.commands.placement import (
    check_placement_options,
    is_stage_worker,
    placed_model,
    run_stage_worker,
    stage_devices,
)
from sliceserve.commands.slicing import check_device
from sliceserve.errors import SliceserveError

log = logging.getLogger("sliceserve")


def make_engine(path: str, args: argparse.Namespace, max_queue: int = 64):
    from sliceserve.engine.engine import Engine
    from sliceserve.engine.kv_blocks import blocks_to_hold
    from sliceserve.engine.loading import load_engine
    from sliceserve.model.loader import load_tokenizer

    check_device(args.device)
    for name in ("max_model_len", "max_batch"):
        if getattr(args, name) < 1:
            raise SliceserveError(f"--{name.replace('_', '-')} must be at least 1")
    token_budget = getattr(args, "max_num_batched_tokens", None)
    if token_budget is not None and token_budget <= args.max_batch:
        raise SliceserveError(
            f"--max-num-batched-tokens ({token_budget}) must exceed --max-batch ({args.max_batch}): a step carries "
            "every running request's decode row and prompt chunks beside them"
        )
    decoding_budget = getattr(args, "max_tokens_while_decoding", None)
    if decoding_budget is not None and decoding_budget <= args.max_batch:
        raise SliceserveError(
            f"--max-tokens-while-decoding ({decoding_budget}) must exceed --max-batch ({args.max_batch}): prompts "
            "must fit beside the running streams' decode rows"
        )
    if max_queue < 1:
        raise SliceserveError("--max-queue must be at least 1")
    kv_memory = kv_cache_memory(args)
    if getattr(args, "engine_process", False) and loads_on_one_device(args):
        return start_engine_process(path, args, max_queue)
    model = placed_model(path, args)  # stages over several devices or processes, else None
    if model is None:
        return load_engine(
            path,
            device=args.device,
            max_batch=args.max_batch,
            max_model_len=args.max_model_len,
            max_queue=max_queue,
            runtime=getattr(args, "runtime", "auto"),
            kv_cache_memory=kv_memory,
            token_budget=token_budget,
            decoding_budget=decoding_budget,
        )
    # stages: reserved rows unless a size is given (ranks in other processes never page)
    blocks = None
    if kv_memory is not None:
        blocks = blocks_to_hold(model, max_batch=args.max_batch, max_model_len=args.max_model_len, memory=kv_memory)
    return Engine(
        model,
        load_tokenizer(path),
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        max_queue=max_queue,
        kv_blocks=blocks,
        token_budget=token_budget,
        decoding_budget=decoding_budget,
    )


def kv_cache_memory(args: argparse.Namespace) -> int | None:
    """--kv-cache-memory in bytes (None: the engine's default)."""
    from sliceserve.planning.sizes import parse_size

    if getattr(args, "kv_cache_memory", None) is None:
        return None
    try:
        return parse_size(args.kv_cache_memory)
    except SliceserveError as error:
        raise SliceserveError(f"--kv-cache-memory: {error}") from None


def loads_on_one_device(args: argparse.Namespace) -> bool:
    """Whether `placed_model` leaves the loading to the engine (it would return None): then a
    child process can load the model itself. Decided without touching CUDA here."""
    check_placement_options(args)
    return not args.distributed and len(stage_devices(args)) == 1


def start_engine_process(path: str, args: argparse.Namespace, max_queue: int):
    """The engine in a process of its own (engine/engine_process.py), loaded there by `make_engine`
    with these options (a --gpu-memory cap then applies in that process, where CUDA runs)."""
    from sliceserve.engine.engine_process import EngineProcess
    from sliceserve.model.loader import load_tokenizer
    from sliceserve.server.gpu_readings import GPUReadings

    in_process = argparse.Namespace(**{**vars(args), "engine_process": False})
    return EngineProcess(
        functools.partial(make_engine, path, in_process, max_queue),
        functools.partial(load_tokenizer, path),
        extra_metrics=GPUReadings(),
    )


def release(engine) -> None:
    """Stop the engine, then the model's other stages (a --distributed front stops every rank)."""
    engine.shutdown()
    engine.model.close()


def serve_checkpoint(path: str, args: argparse.Namespace, banner: str = "") -> int:
    from sliceserve.server.app import serve
    from sliceserve.server.settings import ServerSettings

    check_server_options(args)
    engine = make_engine(path, args, args.max_queue)
    name = args.model_name or Path(path).resolve().name
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        model_name=name,
        max_connections=args.max_connections,
        shutdown_grace=args.shutdown_grace,
    )
    if banner:
        print(banner.format(name=name, host=args.host, port=args.port), flush=True)
    if args.distributed:
        stop_gracefully_on_sigterm()
    try:
        serve(engine, settings)
    finally:
        release(engine)
    return 0


def check_server_options(args: argparse.Namespace) -> None:
    """What can fail before anything is loaded or sliced: the options, and the address (a port
    in use would otherwise end the run after minutes of loading, in uvicorn's traceback)."""
    from sliceserve.server.app import check_address

    if args.max_connections < 1:
        raise SliceserveError("--max-connections must be at least 1")
    if not args.shutdown_grace >= 0:
        raise SliceserveError("--shutdown-grace must be a number of seconds, 0 or more")
    check_address(args.host, args.port)


def stop_gracefully_on_sigterm() -> None:
    """Uvicorn re-raises the SIGTERM it caught once it has shut down; by default that kills
    the process before the other stages are told to stop. Turned into KeyboardInterrupt, it
    ends `serve` normally (as Ctrl-C does), and `release` stops every rank."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def serve_command(args: argparse.Namespace) -> int:
    if is_stage_worker(args):
        return run_stage_worker(args.path, args)
    return serve_checkpoint(args.path, args)


def generate_command(args: argparse.Namespace) -> int:
    from sliceserve.engine.engine import RequestRejected
    from sliceserve.engine.requests import SamplingParams

    if is_stage_worker(args):
        return run_stage_worker(args.path, args)
    engine = make_engine(args.path, args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
    )
    if args.chat:
        from sliceserve.server.chat_template import ChatTemplateError, render_chat

        if not getattr(engine.tokenizer, "chat_template", None):
            raise SliceserveError("this checkpoint's tokenizer has no chat template: drop --chat")
        try:
            ids = render_chat(engine.tokenizer, [{"role": "user", "content": args.prompt}])
        except ChatTemplateError as error:
            release(engine)
            raise SliceserveError(f"--chat: {error}") from None
    else:
        ids = engine.tokenizer(args.prompt)["input_ids"]
    engine.start()
    try:
        sys.stdout.write(args.prompt if not args.chat else "")
        for event in engine.generate(ids, params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.finished:
                print(
                    f"\n[{event.finish_reason}: {event.prompt_tokens} prompt + {event.completion_tokens} "
                    f"generated tokens]",
                    file=sys.stderr,
                )
    except RequestRejected as error:
        raise SliceserveError(str(error)) from None
    finally:
        release(engine)
    return 0


def demo_cache_dir() -> Path:
    root = (
        os.environ.get("SLICESERVE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sliceserve"
    )
    return Path(root)


DEMO_MODEL = "smollm2-135m"
DEMO_SEED = 42
DEMO_BATCH = 16  # sequences sampled (and sliced) together
DEMO_DTYPE = "bfloat16"  # measured: decodes faster than float32 at the demo's 8 rows on this CPU (README)
DEMO_RECOVER_BATCH = 4  # sequences per distillation step
DEMO_RECOVER_LR = 1e-3


def demo_calibration(source, name: str, nsamples: int, seqlen: int, model_loader) -> tuple:
    """The demo's generated calibration text (tokens, mask): sampled once per model and size,
    then read from the cache, whatever the sparsity."""
    from sliceserve.slicing.self_calibration import cached_generated_windows

    key = {"source": name, "nsamples": nsamples, "seqlen": seqlen, "seed": DEMO_SEED}
    cache_file = demo_cache_dir() / "calibration" / f"{name}-generated-{nsamples}x{seqlen}-seed{DEMO_SEED}.safetensors"
    return cached_generated_windows(cache_file, key, model_loader, source.tokenizer(), batch_size=DEMO_BATCH)


def demo_checkpoint_name(name: str, sparsity: float, recover_steps: int) -> str:
    sliced = f"{name}-sliced-{round(sparsity * 100)}"
    return f"{sliced}-distilled-{recover_steps}" if recover_steps else sliced


def make_demo_checkpoint(
    source, name: str, out: Path, *, sparsity: float, nsamples: int, seqlen: int, recover_steps: int
) -> Path:
    """Slice `source` on its own (cached) generated text and write `out` in the demo's dtype;
    with `recover_steps`, distil the slice towards the dense model on the same text first."""
    import tempfile

    from sliceserve.finetuning.distillation import Distillation, Teacher
    from sliceserve.finetuning.lora import LoraSettings, finetune_checkpoint
    from sliceserve.slicing.calibration import calibration_batches
    from sliceserve.slicing.checkpoint_writer import DTYPES, slice_checkpoint
    from sliceserve.slicing.self_calibration import dense_runtime_model

    dense = functools.cache(lambda: dense_runtime_model(source))  # sampling and distillation share it
    tokens, mask = demo_calibration(source, name, nsamples, seqlen, dense)
    text = {"source": "generated", "nsamples": nsamples, "seqlen": seqlen, "seed": DEMO_SEED}
    slicing = dict(sparsity=sparsity, calibration={**text, "batch_size": DEMO_BATCH}, overwrite=True)
    if not recover_steps:
        batches = calibration_batches(tokens, mask, DEMO_BATCH)
        return slice_checkpoint(source, out, batches, dtype=DTYPES[DEMO_DTYPE], **slicing)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.unrecovered-") as staging:
        # sliced in float32, so that the training starts from unrounded weights
        sliced = slice_checkpoint(
            source, Path(staging) / "sliced", calibration_batches(tokens, mask, DEMO_BATCH), **slicing
        )
        teacher = Teacher(dense(), source.description, source.tokenizer())
        return finetune_checkpoint(
            sliced,
            out,
            calibration_batches(tokens, mask, DEMO_RECOVER_BATCH),
            LoraSettings(steps=recover_steps, learning_rate=DEMO_RECOVER_LR, seed=DEMO_SEED),
            distillation=Distillation(teacher),
            data={**text, "batch_size": DEMO_RECOVER_BATCH, "sampled_from": "teacher"},
            dtype=DTYPES[DEMO_DTYPE],
            overwrite=True,
        )


def demo_command(args: argparse.Namespace) -> int:
    from sliceserve.checkpoint import open_checkpoint
    from sliceserve.slicing.sources import open_source

    if args.distributed:
        raise SliceserveError(
            "demo does not run --distributed: run `sliceserve demo` once, then "
            "torchrun ... -m sliceserve serve CHECKPOINT --distributed"
        )
    recover_steps = getattr(args, "recover_steps", DEMO_RECOVER_STEPS)
    if recover_steps < 0:
        raise SliceserveError(f"--recover-steps must be 0 or more, got {recover_steps}")
    check_server_options(args)  # before minutes of slicing
    path = demo_cache_dir() / demo_checkpoint_name(DEMO_MODEL, args.sparsity, recover_steps)
    try:
        open_checkpoint(path, verify=False)
        log.info("using the cached demo checkpoint %s", path)
    except SliceserveError:
        log.info(
            "slicing SmolLM2-135M at %.0f%%%s (calibration text sampled from the model itself, once; then cached)",
            args.sparsity * 100,
            f", then distilling from the dense model for {recover_steps} steps" if recover_steps else "",
        )
        source = open_source(DEMO_MODEL)
        make_demo_checkpoint(
            source,
            DEMO_MODEL,
            path,
            sparsity=args.sparsity,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            recover_steps=recover_steps,
        )
    args.model_name = args.model_name or "sliced"
    base = "http://{host}:{port}/v1"
    auth = ' -H "Authorization: Bearer $SLICESERVE_API_KEY"' if args.api_key else ""
    banner = (
        "\nsliceserve demo: SmolLM2-135M-Instruct sliced at "
        + f"{args.sparsity:.0%}"
        + (f", distilled for {recover_steps} steps" if recover_steps else "")
        + f" ({path})\n"
        "  OpenAI base URL: " + base + "\n"
        "  try:  curl -s "
        + base
        + "/chat/completions -H 'Content-Type: application/json'"
        + auth
        + ' -d \'{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], '
        '"max_tokens": 32, "temperature": 0}}\'\n'
    )
    return serve_checkpoint(str(path), args, banner)
