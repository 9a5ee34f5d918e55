"""Distillation: a sliced model's LoRA adapters learn the dense model's next-token distribution.

At every real (unmasked) position t of a sequence x the loss is the Kullback-Leibler divergence
of the student's temperature-1 softmax from the teacher's,

    KL(p_teacher || p_student) = sum_v p_teacher(v | x<=t) (log p_teacher(v | x<=t) - log p_student(v | x<=t)),

averaged over the real positions, optionally mixed with the language-model loss (the
cross-entropy of the next token): (1 - w) KL + w LM. It needs no labels, so text sampled from
the dense model itself ("generated") is enough. The teacher is our runtime's model of the dense
checkpoint or source, in eval mode; its logits are computed without grad for each batch as the
step needs them, and dropped after it (a data set's worth would be nsamples x seqlen x vocab
floats: 1.6 GB for the demo's 32 x 256 x 49152).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sliceserve.checkpoint import is_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.model.decoder import Transformer
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.model.spec import DecoderSpec


@dataclass
class Teacher:
    model: Transformer  # logits (B, T, vocab) from token ids (B, T)
    description: str  # what it was loaded from, for the record
    tokenizer: Any = None  # None when the teacher carries none


@dataclass
class Distillation:
    teacher: Teacher
    lm_weight: float = 0.0  # share of the language-model loss in the mix

    def check(self) -> None:
        if not 0.0 <= self.lm_weight <= 1.0:
            raise SliceserveError(f"--lm-weight must be in [0, 1], got {self.lm_weight}")

    def record(self) -> dict:
        return {"teacher": self.teacher.description, "temperature": 1.0, "lm_weight": self.lm_weight}


def load_teacher(name: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Teacher:
    """The teacher: a checkpoint of ours (dense, usually), a Hugging Face folder, a .gguf file
    or the demo alias (those three made into our dense runtime model, as the slicer sees them)."""
    if is_checkpoint(name):
        path = Path(name)
        tokenizer = load_tokenizer(path) if (path / "tokenizer_config.json").is_file() else None
        return Teacher(load_model(path, device=device, dtype=dtype), str(path.resolve()), tokenizer)
    from sliceserve.slicing.self_calibration import dense_runtime_model
    from sliceserve.slicing.sources import open_source

    source = open_source(str(name))
    try:
        tokenizer = source.tokenizer()
    except SliceserveError:  # a folder without a tokenizer: only the sizes can be compared
        tokenizer = None
    return Teacher(dense_runtime_model(source, dtype).to(device), source.description, tokenizer)


def check_teacher_fits(teacher: Teacher, student: DecoderSpec, student_tokenizer: Any, seqlen: int) -> None:
    """Refuse a teacher whose distributions cannot be compared with the student's token by token."""
    spec = teacher.model.spec
    if spec.vocab_size != student.vocab_size:
        raise SliceserveError(
            f"the teacher {teacher.description} has a vocabulary of {spec.vocab_size} tokens and the student "
            f"{student.vocab_size}: distillation needs both to share one tokenizer"
        )
    if teacher.tokenizer is not None and student_tokenizer is not None:
        if teacher.tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise SliceserveError(
                f"the teacher {teacher.description} has a different vocabulary (tokenizer) from the student's, "
                "though of the same size: distillation needs both to share one tokenizer"
            )
    if seqlen > spec.max_positions:
        raise SliceserveError(f"--seqlen {seqlen} exceeds the teacher's {spec.max_positions} positions")


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is True of KL(softmax(teacher) || softmax(student))."""
    dtype = student_logits.dtype
    student_log_p = F.log_softmax(student_logits, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits.to(dtype), dim=-1)
    per_position = F.kl_div(student_log_p, teacher_log_p, reduction="none", log_target=True).sum(-1)
    return per_position[mask].mean()


def distillation_loss(
    distillation: Distillation, model, tokens: torch.Tensor, mask: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """One batch's (1 - w) KL + w LM for the student `model` (a Transformers causal LM)."""
    tokens, mask = tokens.to(device), mask.to(device)
    with torch.no_grad():
        teacher_logits = distillation.teacher.model(tokens)  # right padding: real tokens never see it
    weight = distillation.lm_weight
    labels = tokens.masked_fill(~mask, -100) if weight else None
    output = model(input_ids=tokens, attention_mask=mask.long(), labels=labels)
    kl = kl_to_teacher(output.logits, teacher_logits, mask)
    return kl if not weight else (1.0 - weight) * kl + weight * output.loss
