"""The command line on bad input: one line naming the problem, a non-zero exit, no traceback,
nothing half-written. Each case runs the real command in a subprocess.

The happy path is here too (slice, info, ppl on a tiny random Llama), since the broken
checkpoints are made from a good one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_support import MAX_POSITIONS, assert_nothing_written, assert_one_line_error, run_sliceserve, save_tiny_llama

SLICE_CALIBRATION = ["--nsamples", "4", "--seqlen", "16", "--batch-size", "2"]
WORDS = (
    "the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat "
    "near an old red barn and many birds sing in tall green trees"
).split()


# -- the fixtures: a tiny model, its broken variants, a good checkpoint and broken copies ----------


def copy_with_config(source: Path, folder: Path, **changes) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_gguf(path: Path, array: np.ndarray, tensor_type) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", array, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder holding the tiny model, calibration texts, and broken models and files."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    work = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(400))
    (work / "some.txt").write_text(text)
    (work / "empty.txt").write_text("")
    (work / "blank.txt").write_text("  \n\n\t \n")
    tiny = work / "tiny"
    save_tiny_llama(tiny, text)

    copy_with_config(tiny, work / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    copy_with_config(tiny, work / "gemma2", model_type="gemma2", architectures=["Gemma2ForCausalLM"])
    shutil.copytree(tiny, work / "bad-json")
    (work / "bad-json" / "config.json").write_text('{"model_type": "llama", oops')
    truncate(shutil.copytree(tiny, work / "truncated-weights") / "model.safetensors")
    flip_byte(shutil.copytree(tiny, work / "flipped-weights") / "model.safetensors", 10)  # in the header

    write_gguf(work / "f64.gguf", np.ones((4, 8), dtype=np.float64), GGMLQuantizationType.F64)
    q8_1 = GGMLQuantizationType.Q8_1
    block_bytes = GGML_QUANT_SIZES[q8_1][1]  # one block of 32 values per row
    write_gguf(work / "q8_1.gguf", np.zeros((4, block_bytes), dtype=np.uint8), q8_1)
    (work / "x.gguf").write_text("this is not a GGUF file\n")
    return work


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    """A good sliced checkpoint, plus broken copies of it beside it."""
    ck = work / "ck"
    result = run_sliceserve(
        "slice",
        work / "tiny",
        "--sparsity",
        "0.25",
        "--calibration",
        work / "some.txt",
        *SLICE_CALIBRATION,
        "--out",
        ck,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    shard = "model-00001.safetensors"
    truncate(shutil.copytree(ck, work / "ck-truncated") / shard)
    flip_byte(shutil.copytree(ck, work / "ck-flipped") / shard, (ck / shard).stat().st_size // 2)
    copy_with_config(ck, work / "ck-v99", format_version=99)
    shutil.copytree(ck, work / "ck-bad-json")
    (work / "ck-bad-json" / "config.json").write_text('{"format": "sliceserve", oops')
    return ck


# -- the happy path ------------------------------------------------------------------------------


def test_good_checkpoint_info_and_ppl(work: Path, checkpoint: Path, tmp_path: Path):
    info = run_sliceserve("info", checkpoint, "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout.strip().splitlines()[-1])
    assert summary["family"] == "llama" and summary["sliced"]
    assert summary["original_width"] == 64 and summary["embedding_width"] == 48  # 0.75 * 64

    ppl = run_sliceserve("ppl", checkpoint, "--data", work / "some.txt", "--seqlen", "16", "--json", cwd=tmp_path)
    assert ppl.returncode == 0, ppl.stderr
    result = json.loads(ppl.stdout.strip().splitlines()[-1])
    assert set(result) >= {"ppl", "tokens", "windows"}
    assert result["ppl"] > 1 and result["tokens"] > 0 and result["windows"] > 0


# -- slice and export: the source, the options, the calibration text -----------------------------

SLICE_CASES = {
    # name: (model, extra arguments, words the error must hold)
    "missing-path": ("no-such-model", [], ["not found", "no-such-model"]),
    "unsupported-family": ("gpt2", [], ["unsupported", "gpt2"]),
    "refused-family": ("gemma2", [], ["gemma2", "cannot be sliced", "norm"]),
    "config-not-json": ("bad-json", [], ["config.json", "json"]),
    "truncated-safetensors": ("truncated-weights", [], ["model.safetensors", "cannot read"]),
    "corrupt-safetensors": ("flipped-weights", [], ["model.safetensors", "cannot read"]),
    "sparsity-one": ("tiny", ["--sparsity", "1.0"], ["--sparsity", "[0, 1)", "1.0"]),
    "sparsity-negative": ("tiny", ["--sparsity", "-0.1"], ["--sparsity", "[0, 1)", "-0.1"]),
    "seqlen-too-long": ("tiny", ["--seqlen", "100"], ["--seqlen 100", f"{MAX_POSITIONS} positions"]),
    "empty-calibration": ("tiny", ["--calibration", "{work}/empty.txt"], ["calibration", "empty"]),
    "blank-calibration": ("tiny", ["--calibration", "{work}/blank.txt"], ["calibration", "empty"]),
    "missing-calibration": ("tiny", ["--calibration", "{work}/missing.txt"], ["missing.txt", "does not exist"]),
    "gguf-f64": ("f64.gguf", [], ["unsupported GGUF quantization", "F64"]),
    "gguf-q8_1": ("q8_1.gguf", [], ["unsupported GGUF quantization", "Q8_1"]),
    "not-gguf": ("x.gguf", [], ["x.gguf", "not a readable GGUF"]),
    "no-gpu": ("tiny", ["--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
}
# export opens the source as slice does; a few cases show it goes through the same checks.
EXPORT_CASES = ["missing-path", "unsupported-family", "truncated-safetensors", "gguf-f64", "no-gpu"]


def slice_arguments(work: Path, extra: list[str]) -> list[str]:
    """Good defaults for slice, with `extra` options replacing them."""
    options = {
        "--sparsity": "0.25",
        "--calibration": str(work / "some.txt"),
        "--nsamples": "4",
        "--seqlen": "16",
        "--batch-size": "2",
    }
    for flag, value in zip(extra[::2], extra[1::2]):
        options[flag] = value.format(work=work)
    return [item for pair in options.items() for item in pair]


def skip_if_gpu(name: str) -> None:
    if name == "no-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")


@pytest.mark.parametrize("name", list(SLICE_CASES))
def test_slice_refuses(work: Path, tmp_path: Path, name: str):
    skip_if_gpu(name)
    model, extra, words = SLICE_CASES[name]
    out = tmp_path / "out"
    result = run_sliceserve("slice", work / model, *slice_arguments(work, extra), "--out", out, cwd=tmp_path)
    assert_one_line_error(result, *words)
    assert_nothing_written(out)


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_export_refuses(work: Path, tmp_path: Path, name: str):
    skip_if_gpu(name)
    model, extra, words = SLICE_CASES[name]
    out = tmp_path / "out"
    result = run_sliceserve("export", work / model, *extra, "--out", out, cwd=tmp_path)
    assert_one_line_error(result, *words)
    assert_nothing_written(out)


@pytest.mark.parametrize("command", ["slice", "export"])
def test_existing_out_is_refused_and_left_untouched(work: Path, tmp_path: Path, command: str):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    arguments = slice_arguments(work, []) if command == "slice" else []
    result = run_sliceserve(command, work / "tiny", *arguments, "--out", out, cwd=tmp_path)
    # One line also means the refusal came before calibration (which logs a line) or any slicing.
    assert_one_line_error(result, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- ppl and info: broken checkpoints and bad options --------------------------------------------

CHECKPOINT_CASES = {
    # name: (path, words the error must hold)
    "missing": ("no-such-checkpoint", ["not found", "no-such-checkpoint"]),
    "truncated-shard": ("ck-truncated", ["model-00001.safetensors", "corrupt or truncated"]),
    "flipped-byte": ("ck-flipped", ["model-00001.safetensors", "corrupt or truncated"]),
    "format-version-99": ("ck-v99", ["format_version 99"]),
    "config-not-json": ("ck-bad-json", ["config.json", "valid json"]),
}


@pytest.mark.parametrize("command", ["info", "ppl"])
@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_broken_checkpoint_is_refused(work: Path, checkpoint: Path, tmp_path: Path, command: str, name: str):
    path, words = CHECKPOINT_CASES[name]
    extra = ["--data", str(work / "some.txt"), "--seqlen", "16"] if command == "ppl" else []
    result = run_sliceserve(command, work / path, *extra, cwd=tmp_path)
    assert_one_line_error(result, *words)


PPL_CASES = {
    "seqlen-too-long": (
        ["--data", "{work}/some.txt", "--seqlen", "100"],
        ["--seqlen 100", f"{MAX_POSITIONS} positions"],
    ),
    "empty-data": (["--data", "{work}/empty.txt", "--seqlen", "16"], ["0 tokens"]),
    "missing-data": (["--data", "{work}/missing.txt", "--seqlen", "16"], ["missing.txt", "does not exist"]),
    "no-gpu": (["--data", "{work}/some.txt", "--seqlen", "16", "--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
}


@pytest.mark.parametrize("name", list(PPL_CASES))
def test_ppl_refuses(work: Path, checkpoint: Path, tmp_path: Path, name: str):
    skip_if_gpu(name)
    extra, words = PPL_CASES[name]
    result = run_sliceserve("ppl", checkpoint, *(a.format(work=work) for a in extra), cwd=tmp_path)
    assert_one_line_error(result, *words)
