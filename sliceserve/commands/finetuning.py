"""`sliceserve finetune`: recovery fine-tuning (LoRA) of a checkpoint, merged into a new one."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from sliceserve.checkpoint import check_destination, checkpoint_spec, read_config
from sliceserve.commands.slicing import check_device
from sliceserve.errors import SliceserveError
from sliceserve.finetuning.lora import LoraSettings, finetune_checkpoint
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.slicing.calibration import load_calibration

log = logging.getLogger("sliceserve")


def finetune_command(args: argparse.Namespace) -> int:
    settings = LoraSettings(
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        steps=args.steps,
        learning_rate=args.lr,
        train_shortcuts=args.train_shortcuts,
        seed=args.seed,
    )
    settings.check()
    check_device(args.device)
    spec = checkpoint_spec(read_config(args.checkpoint))
    if args.seqlen > spec.max_positions:
        raise SliceserveError(f"--seqlen {args.seqlen} exceeds the model's {spec.max_positions} positions")
    check_destination(Path(args.out).absolute(), args.overwrite)  # fail before the long work
    batches = load_calibration(
        args.data,
        load_tokenizer(args.checkpoint),
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        model_loader=lambda: load_model(args.checkpoint, device=args.device, dtype=torch.float32),
    )
    log.info("training text: %s, %d x %d tokens, seed %d", args.data, args.nsamples, args.seqlen, args.seed)
    data = {
        "source": args.data,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    out = finetune_checkpoint(
        args.checkpoint, args.out, batches, settings, device=args.device, data=data, overwrite=args.overwrite
    )
    log.info("wrote %s", out)
    return 0
