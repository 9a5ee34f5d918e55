"""`sliceserve prune`: N:M sparsity (SparseGPT or magnitude) in the checkpoint format."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sliceserve.checkpoint import check_destination
from sliceserve.commands.slicing import calibration_from_args, check_device, check_seqlen
from sliceserve.pruning.checkpoint_writer import prune_checkpoint
from sliceserve.pruning.pattern import check_method, check_pattern_fits, parse_pattern
from sliceserve.slicing.checkpoint_writer import DTYPES
from sliceserve.slicing.families import decoder_spec
from sliceserve.slicing.sources import open_source

log = logging.getLogger("sliceserve")


def prune_command(args: argparse.Namespace) -> int:
    pattern = parse_pattern(args.pattern)
    method = check_method(args.method)
    check_device(args.device)
    source = open_source(args.model)
    check_pattern_fits(decoder_spec(source.family, source.config), pattern)
    if method == "sparsegpt":
        check_seqlen(source, args.seqlen)
    check_destination(Path(args.out).absolute(), args.overwrite)  # fail before the long work
    batches, calibration = None, None
    if method == "sparsegpt":
        batches, calibration = calibration_from_args(args, source)
    else:
        log.info("magnitude pruning reads no calibration text")
    out = prune_checkpoint(
        source,
        args.out,
        batches,
        pattern=pattern,
        method=method,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        calibration=calibration,
        overwrite=args.overwrite,
        compute_dtype=DTYPES[args.compute_dtype] if args.compute_dtype else None,
    )
    log.info("wrote %s", out)
    return 0
