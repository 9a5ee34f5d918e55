"""`sliceserve finetune`: recovery fine-tuning (LoRA) of a checkpoint, merged into a new one; with
`--distill-from`, trained to match a dense model's next-token distribution."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from sliceserve.checkpoint import check_destination, checkpoint_spec, read_config
from sliceserve.commands.slicing import calibration_text, check_device
from sliceserve.errors import SliceserveError
from sliceserve.finetuning.distillation import Distillation, check_teacher_fits, load_teacher
from sliceserve.finetuning.lora import LoraSettings, finetune_checkpoint, training_dtype
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.slicing.checkpoint_writer import DTYPES

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
    if args.lm_weight and not args.distill_from:
        raise SliceserveError("--lm-weight applies only with --distill-from")
    check_device(args.device)
    config = read_config(args.checkpoint)
    spec = checkpoint_spec(config)
    if args.seqlen > spec.max_positions:
        raise SliceserveError(f"--seqlen {args.seqlen} exceeds the model's {spec.max_positions} positions")
    check_destination(Path(args.out).absolute(), args.overwrite)  # fail before the long work
    tokenizer = load_tokenizer(args.checkpoint)
    distillation = None
    if args.distill_from:
        distillation = Distillation(
            load_teacher(
                args.distill_from,
                device=args.device,
                dtype=training_dtype(DTYPES.get(config.get("dtype"), torch.float32)),
            ),
            lm_weight=args.lm_weight,
        )
        distillation.check()
        check_teacher_fits(distillation.teacher, spec, tokenizer, args.seqlen)  # before sampling any text
        log.info("distilling from %s", distillation.teacher.description)

    def text_model():  # "generated" text comes from the teacher when there is one
        if distillation is not None:
            return distillation.teacher.model
        return load_model(args.checkpoint, device=args.device, dtype=torch.float32)

    batches, data = calibration_text(args, tokenizer, text_model, text=args.data, what="training text")
    if distillation is not None and args.data == "generated":
        data["sampled_from"] = "teacher"
    out = finetune_checkpoint(
        args.checkpoint,
        args.out,
        batches,
        settings,
        device=args.device,
        data=data,
        distillation=distillation,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.overwrite,
    )
    log.info("wrote %s", out)
    return 0
