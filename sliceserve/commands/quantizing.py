"""`sliceserve quantize`: a checkpoint of ours with its block linears in 8 or 4 bits."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sliceserve.checkpoint import check_destination, checkpoint_spec, open_checkpoint
from sliceserve.errors import SliceserveError

log = logging.getLogger("sliceserve")


def quantize_command(args: argparse.Namespace) -> int:
    from sliceserve.commands.slicing import calibration_text
    from sliceserve.model.loader import load_model, load_tokenizer
    from sliceserve.quantization.checkpoint_writer import quantize_checkpoint
    from sliceserve.quantization.rotation import check_rotation

    if args.group_size < 2:
        raise SliceserveError(f"--group-size must be at least 2, got {args.group_size}")
    config = open_checkpoint(args.checkpoint, verify=False).config  # a readable checkpoint, before anything else
    rotate = "orthogonal" if args.rotate else "hadamard" if args.hadamard else None
    if rotate is not None:
        check_rotation(checkpoint_spec(config), rotate)  # before the calibration text is read
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
        rotate=rotate,
        seed=args.rotation_seed,
        overwrite=args.overwrite,
    )
    log.info("wrote %s", out)
    return 0
