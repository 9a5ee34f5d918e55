"""`sliceserve quantize`: a checkpoint of ours with its block linears in 8 or 4 bits."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sliceserve.checkpoint import check_destination, open_checkpoint
from sliceserve.errors import SliceserveError

log = logging.getLogger("sliceserve")


def quantize_command(args: argparse.Namespace) -> int:
    from sliceserve.commands.slicing import calibration_text
    from sliceserve.model.loader import load_model, load_tokenizer
    from sliceserve.quantization.checkpoint_writer import quantize_checkpoint

    if args.group_size < 2:
        raise SliceserveError(f"--group-size must be at least 2, got {args.group_size}")
    open_checkpoint(args.checkpoint, verify=False)  # a readable checkpoint, before anything else
    check_destination(Path(args.out).absolute(), args.overwrite)
    batches, calibration = None, None
    if args.method == "gptq":
        batches, calibration = calibration_text(
            args, load_tokenizer(args.checkpoint), lambda: load_model(args.checkpoint)
        )
    out = quantize_checkpoint(
        args.checkpoint,
        args.out,
        bits=args.bits,
        group_size=args.group_size,
        method=args.method,
        batches=batches,
        calibration=calibration,
        shortcuts=args.shortcuts,
        rotate=args.rotate,
        seed=args.rotation_seed,
        overwrite=args.overwrite,
    )
    log.info("wrote %s", out)
    return 0
