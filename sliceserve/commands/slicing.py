"""`sliceserve slice` and `sliceserve export`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sliceserve.checkpoint import check_destination
from sliceserve.errors import SliceserveError
from sliceserve.slicing.calibration import load_calibration
from sliceserve.slicing.checkpoint_writer import DTYPES, export_checkpoint, slice_checkpoint
from sliceserve.slicing.random_checkpoint import RANDOM_PREFIX, export_random_checkpoint
from sliceserve.slicing.self_calibration import dense_runtime_model
from sliceserve.slicing.slicer import kept_width
from sliceserve.slicing.sources import ModelSource, open_source

log = logging.getLogger("sliceserve")


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SliceserveError(f"--device {device} asked for, but no CUDA GPU is available")


def check_seqlen(source: ModelSource, seqlen: int) -> None:
    max_positions = getattr(source.config, "max_position_embeddings", None)
    if max_positions is not None and seqlen > max_positions:
        raise SliceserveError(f"--seqlen {seqlen} exceeds the model's {max_positions} positions")


def calibration_from_args(args: argparse.Namespace, source: ModelSource) -> tuple[list, dict]:
    """The calibration batches the options of `add_calibration_options` ask for, and their record."""
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise SliceserveError("this model has no tokenizer, so calibration text cannot be tokenized")
    return calibration_text(args, tokenizer, lambda: dense_runtime_model(source))


def calibration_text(
    args: argparse.Namespace, tokenizer, model_loader, text: str | None = None, what: str = "calibration"
) -> tuple[list, dict]:
    """calibration_from_args for any tokenizer; `model_loader` gives the model "generated" samples from.
    `text` is where the text comes from (default --calibration), `what` the log's name for it."""
    text = args.calibration if text is None else text
    batches = load_calibration(
        text,
        tokenizer,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        model_loader=model_loader,
    )
    # Logged once the text is found, so a calibration error stays a one-line message.
    log.info("%s: %s, %d x %d tokens, seed %d", what, text, args.nsamples, args.seqlen, args.seed)
    calibration = {
        "source": text,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    return batches, calibration


def slice_command(args: argparse.Namespace) -> int:
    if args.round_to < 1:
        raise SliceserveError(f"--round-to must be at least 1, got {args.round_to}")
    check_device(args.device)
    source = open_source(args.model)
    kept_width(source.config.hidden_size, args.sparsity, args.round_to)  # validates --sparsity early
    check_seqlen(source, args.seqlen)
    check_destination(Path(args.out).absolute(), args.overwrite)  # fail before the long work
    batches, calibration = calibration_from_args(args, source)
    out = slice_checkpoint(
        source,
        args.out,
        batches,
        sparsity=args.sparsity,
        round_to=args.round_to,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        calibration=calibration,
        overwrite=args.overwrite,
        compute_dtype=DTYPES[args.compute_dtype] if args.compute_dtype else None,
    )
    log.info("wrote %s", out)
    return 0


def export_command(args: argparse.Namespace) -> int:
    check_device(args.device)
    if args.model.startswith(RANDOM_PREFIX):
        return export_random_command(args)
    given = [option for option in ("tokenizer", "sparsity", "seed") if getattr(args, option) is not None]
    if given:
        raise SliceserveError(f"--{given[0]} applies only to random:SHAPE models, not to {args.model}")
    source = open_source(args.model)
    check_destination(Path(args.out).absolute(), args.overwrite)
    out = export_checkpoint(
        source, args.out, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device, overwrite=args.overwrite
    )
    log.info("wrote %s", out)
    return 0


def export_random_command(args: argparse.Namespace) -> int:
    """`export random:SHAPE`: random weights of a real shape, float16 unless --dtype says otherwise."""
    out = export_random_checkpoint(
        args.model.removeprefix(RANDOM_PREFIX),
        args.out,
        tokenizer_dir=args.tokenizer,
        sparsity=args.sparsity or 0.0,
        dtype=DTYPES[args.dtype or "float16"],
        device=args.device,
        seed=args.seed or 0,
        overwrite=args.overwrite,
    )
    log.info("wrote %s", out)
    return 0
