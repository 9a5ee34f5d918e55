"""Where the model runs for `serve` and `generate`: one device, stages over several devices
in this process (`--gpus`, `--devices`), or one stage per torchrun process (`--distributed`);
and the per-card memory cap (`--gpu-memory`)."""

from __future__ import annotations

import argparse
import logging
import signal

import torch

from sliceserve.commands.slicing import check_device
from sliceserve.errors import SliceserveError
from sliceserve.planning.placement import checkpoint_stage_ranges
from sliceserve.planning.planner import describe_layers
from sliceserve.planning.sizes import parse_size

log = logging.getLogger("sliceserve")


def stage_devices(args: argparse.Namespace) -> list[str]:
    """The devices the options name, one stage each (just --device when none is named)."""
    if args.gpus is not None and args.devices:
        raise SliceserveError("give --gpus or --devices, not both")
    if args.distributed and (args.gpus is not None or args.devices):
        raise SliceserveError("--distributed places one stage per process: drop --gpus/--devices")
    if args.gpus is not None:
        if args.gpus < 1:
            raise SliceserveError(f"--gpus must be at least 1, got {args.gpus}")
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if args.gpus > available:
            raise SliceserveError(f"--gpus {args.gpus} asked for, but {available} GPU(s) are available")
        return [f"cuda:{i}" for i in range(args.gpus)]
    devices = [d.strip() for d in (args.devices or args.device).split(",") if d.strip()]
    if not devices:
        raise SliceserveError("--devices names no device")
    for device in devices:
        try:
            torch.device(device)
        except RuntimeError:
            raise SliceserveError(f"unknown device {device!r} (as cpu, cuda, cuda:1)") from None
        check_device(device)
    return devices


def check_placement_options(args: argparse.Namespace) -> None:
    stage_devices(args)
    if args.gpu_memory is not None:
        parse_size(args.gpu_memory)
    if args.micro_batches is not None and args.micro_batches < 1:
        raise SliceserveError(f"--micro-batches must be at least 1, got {args.micro_batches}")


def placed_model(path: str, args: argparse.Namespace):
    """The model to serve when the options spread it (pipeline or distributed front), or
    None for one device (then the engine loads it as usual, on args.device)."""
    from sliceserve.planning.memory_budget import apply_memory_budget

    check_placement_options(args)
    budget = parse_size(args.gpu_memory) if args.gpu_memory else None
    if args.distributed:
        return distributed_front(path, args, budget)
    devices = stage_devices(args)
    ranges = None
    if len(devices) > 1 or budget is not None:  # with a budget, a single device is checked too
        ranges = stage_ranges(path, len(devices), args, budget)
    if budget is not None:
        apply_memory_budget([torch.device(d) for d in devices], budget)
    if len(devices) == 1:
        args.device = devices[0]
        return None
    from sliceserve.parallel.loading import load_pipeline

    for i, (device, layers) in enumerate(zip(devices, ranges)):
        log.info("stage %d: layers %s on %s", i, describe_layers(layers), device)
    return load_pipeline(path, devices, ranges, runtime=runtime_option(args))


def stage_ranges(path: str, stages: int, args: argparse.Namespace, budget: int | None) -> list[range]:
    """The checkpoint's layers split over `stages` for the server's batch, context and step."""
    return checkpoint_stage_ranges(
        path,
        stages,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        budget=budget,
        step_tokens=getattr(args, "max_num_batched_tokens", None),  # the server's token budget a step
    )


def runtime_option(args: argparse.Namespace) -> str:
    return getattr(args, "runtime", "auto")


def runs_fast_path(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether this process's stage runs the fast path (--runtime; auto: on a GPU)."""
    from sliceserve.fast.selection import use_fast_path

    return use_fast_path(runtime_option(args), device)


def own_stage(path: str, args: argparse.Namespace, process, budget: int | None):
    """This process's stage of a --distributed run: its share of the layers, on its device,
    on the fast path when `runs_fast_path` says so (eager: no CUDA graphs across processes)."""
    from sliceserve.checkpoint import checkpoint_spec, open_checkpoint
    from sliceserve.fast.selection import uses_sparse_tensor_cores
    from sliceserve.parallel.loading import build_stage
    from sliceserve.parallel.stages import make_stage
    from sliceserve.planning.memory_budget import apply_memory_budget

    ranges = stage_ranges(path, process.world_size, args, budget)
    if budget is not None:
        apply_memory_budget([process.device], budget)
    layers = ranges[process.rank]
    checkpoint = open_checkpoint(path)
    model = build_stage(
        checkpoint,
        checkpoint_spec(checkpoint.config),
        layers,
        first=process.rank == 0,
        last=process.is_last,
        device=process.device,
    )
    fast = runs_fast_path(args, process.device)
    stage = make_stage(
        model, process.device, fast=fast, semi_structured=fast and uses_sparse_tensor_cores(path, process.device)
    )
    log.info(
        "stage %d of %d: layers %s on %s (%s), %s path",
        process.rank,
        process.world_size,
        describe_layers(layers),
        process.device,
        process.backend,
        "fast" if fast else "reference",
    )
    return stage, layers


def distributed_front(path: str, args: argparse.Namespace, budget: int | None):
    from sliceserve.parallel.front import DistributedPipeline
    from sliceserve.parallel.process_group import start_stage_process

    process = start_stage_process(args.device)
    stage, _ = own_stage(path, args, process, budget)
    return DistributedPipeline(stage, process, args.micro_batches or process.world_size)


def is_stage_worker(args: argparse.Namespace) -> bool:
    """A --distributed process of rank > 0: it serves its stage, not the engine."""
    from sliceserve.parallel.process_group import process_rank

    return bool(getattr(args, "distributed", False)) and process_rank() > 0


def run_stage_worker(path: str, args: argparse.Namespace) -> int:
    from sliceserve.parallel.process_group import start_stage_process, stop_stage_process
    from sliceserve.parallel.stage_worker import serve_stage

    check_placement_options(args)
    budget = parse_size(args.gpu_memory) if args.gpu_memory else None
    # Ctrl-C reaches every process of the terminal: rank 0 alone decides when the stages stop
    # (it sends STOP once its server has shut down); torchrun ends them if it is interrupted itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    process = start_stage_process(args.device)
    try:
        stage, layers = own_stage(path, args, process, budget)
        serve_stage(stage, layers, process)
    finally:
        stop_stage_process()
    return 0
