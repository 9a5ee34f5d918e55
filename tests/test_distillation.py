"""`sliceserve finetune --distill-from DENSE`: LoRA adapters trained to match the dense model.

A tiny Llama (float64) is the teacher, its 25% slice the student. Distilling on random token
sequences lowers the student's KL divergence to the teacher on sequences it never saw, the
merged checkpoint loads and serves in our runtime and records how it was made, and teachers
whose vocabulary differs (in size, or in tokens at the same size) are refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import save_tiny_llama
from tiny_models import VOCAB, calibration_batches, random_tokens, save_tiny_model, tiny_config, write_tiny_checkpoint
from tiny_models import tiny_model as random_tiny_model

from sliceserve.cli import main
from sliceserve.engine.loading import load_engine
from sliceserve.engine.requests import SamplingParams
from sliceserve.errors import SliceserveError
from sliceserve.finetuning.distillation import Distillation, kl_to_teacher, load_teacher
from sliceserve.finetuning.lora import LoraSettings, finetune_checkpoint
from sliceserve.model.loader import load_model
from sliceserve.slicing.checkpoint_writer import slice_checkpoint
from sliceserve.slicing.sources import FolderSource

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH = 48
SETTINGS = dict(rank=8, alpha=16.0, steps=120, learning_rate=1e-2)


def training_batches(seeds: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(t, torch.ones_like(t, dtype=torch.bool)) for t in (random_tokens(4, LENGTH, s) for s in seeds)]


def kl_of(path: Path, teacher, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kl_to_teacher(load_model(path)(tokens), teacher.model(tokens), torch.ones_like(tokens).bool()))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("distill")
    save_tiny_model("llama", work / "dense")
    write_tiny_checkpoint(work / "dense", "sliced", work / "sliced", torch.float64)
    return work


@pytest.fixture(scope="module")
def teacher(work):
    return load_teacher(work / "dense", dtype=torch.float64)


@pytest.fixture(scope="module")
def distilled(work, teacher) -> Path:
    return finetune_checkpoint(
        work / "sliced",
        work / "distilled",
        training_batches(range(100, 220)),
        LoraSettings(**SETTINGS),
        distillation=Distillation(teacher),
        progress=False,
    )


def test_the_kl_matches_its_definition_and_ignores_padding():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    p = teacher.softmax(-1)
    per_position = (p * (p.log() - student.log_softmax(-1))).sum(-1)
    assert torch.allclose(kl_to_teacher(student, teacher, mask), per_position[mask].mean())
    assert float(kl_to_teacher(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-7)


def test_distillation_lowers_the_kl_to_the_teacher_on_held_out_text(work, teacher, distilled):
    held_out = random_tokens(8, LENGTH, seed=1000)
    before, after = kl_of(work / "sliced", teacher, held_out), kl_of(distilled, teacher, held_out)
    # measured: 0.787 -> 0.638. Random weights have no redundant directions: what the deleted ones
    # carried is gone for good (rank 32 and 600 steps still leave ~0.5 at 16 tokens)
    assert after < 0.9 * before, (before, after)


def test_the_record_says_what_was_distilled_from(work, distilled):
    config = json.loads((distilled / "config.json").read_text())
    record = config["finetuning"]
    assert record["objective"] == "distillation"
    assert record["distillation"] == {
        "teacher": str((work / "dense").resolve()),
        "temperature": 1.0,
        "lm_weight": 0.0,
    }
    assert record["loss"]["last_tenth_mean"] < 0.85 * record["loss"]["first_step"]  # measured: 0.847 -> 0.625
    assert (
        config["dtype"] == "float64"
        and config["model"] == json.loads((work / "sliced" / "config.json").read_text())["model"]
    )


def test_a_mix_with_the_language_model_loss_trains_and_is_recorded(work, teacher, tmp_path):
    out = finetune_checkpoint(
        work / "sliced",
        tmp_path / "mixed",
        training_batches(range(3)),
        LoraSettings(**{**SETTINGS, "steps": 3}),
        distillation=Distillation(teacher, lm_weight=0.5),
        dtype=torch.float32,
        progress=False,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["finetuning"]["distillation"]["lm_weight"] == 0.5 and config["dtype"] == "float32"
    assert load_model(out).head.weight.dtype == torch.float32


def test_a_teacher_with_another_vocabulary_is_refused_before_training(work, tmp_path):
    config = tiny_config("llama")
    config.vocab_size = VOCAB + 32
    random_tiny_model(config).save_pretrained(tmp_path / "other")
    with pytest.raises(SliceserveError, match=f"vocabulary of {VOCAB + 32} tokens and the student {VOCAB}"):
        finetune_checkpoint(
            work / "sliced",
            tmp_path / "out",
            training_batches(range(1)),
            LoraSettings(steps=1),
            distillation=Distillation(load_teacher(tmp_path / "other", dtype=torch.float64)),
            progress=False,
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SliceserveError, match="lm-weight"):
        Distillation(load_teacher(work / "dense"), lm_weight=1.5).check()


# ---- the command line, with tokenizers -------------------------------------------------

WORDS = "the cat sat on the mat and the dog ran to the park while birds sang in old trees".split()
OTHER_WORDS = "a fox jumped over lazy hounds near green hills as rain fell on quiet roads".split()


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory) -> tuple[Path, Path]:
    """A dense Llama folder with a tokenizer, and its 25% slice (which carries the tokenizer)."""
    work = tmp_path_factory.mktemp("distill-cli")
    save_tiny_llama(work / "dense", " ".join(WORDS * 40))
    sliced = slice_checkpoint(
        FolderSource(work / "dense"), work / "sliced", calibration_batches(), sparsity=0.25, progress=False
    )
    return work / "dense", sliced


def test_the_command_distills_on_text_sampled_from_the_teacher_and_the_result_serves(with_tokenizer, tmp_path):
    dense, sliced = with_tokenizer
    out = tmp_path / "distilled"
    argv = ["finetune", str(sliced), "--out", str(out), "--distill-from", str(dense), "--data", "generated"]
    argv += ["--nsamples", "4", "--seqlen", "16", "--batch-size", "2", "--steps", "4", "--rank", "2"]
    assert main(argv) == 0
    record = json.loads((out / "config.json").read_text())["finetuning"]
    assert record["objective"] == "distillation" and record["data"]["sampled_from"] == "teacher"
    engine = load_engine(out, max_batch=1, max_model_len=32)
    engine.start()
    try:
        prompt = engine.tokenizer("the cat sat")["input_ids"]
        events = list(engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)))
    finally:
        engine.shutdown()
    assert sum(len(event.token_ids) for event in events) == 5 and events[-1].finish_reason == "length"


def test_a_teacher_whose_tokens_differ_at_the_same_size_is_one_line_and_writes_nothing(
    with_tokenizer, tmp_path, capsys
):
    _, sliced = with_tokenizer
    save_tiny_llama(tmp_path / "other", " ".join(OTHER_WORDS * 40))  # same vocab_size (200), other words
    capsys.readouterr()
    out = tmp_path / "distilled"
    argv = ["finetune", str(sliced), "--out", str(out), "--distill-from", str(tmp_path / "other"), "--steps", "1"]
    assert main([*argv, "--data", "generated", "--nsamples", "2", "--seqlen", "16"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("sliceserve: error:") and "different vocabulary" in lines[0]
    assert not out.exists()


def test_lm_weight_without_a_teacher_is_refused(with_tokenizer, tmp_path, capsys):
    _, sliced = with_tokenizer
    assert main(["finetune", str(sliced), "--out", str(tmp_path / "o"), "--lm-weight", "0.5"]) == 2
    assert "--lm-weight applies only with --distill-from" in capsys.readouterr().err
