"""`sliceserve export random:SHAPE`: checkpoints of real shapes with random weights.

The tiny shape (width 256, 2 layers, vocabulary 256) is exported through the command line,
dense in float16 and sliced at 25% in float32, with the server tests' 300-token tokenizer;
each must load with the runtime's loader, hold the shapes the spec says, give finite logits
and generate with the engine. Bad input ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from server_support import build_tokenizer

from sliceserve.checkpoint import open_checkpoint
from sliceserve.cli import main
from sliceserve.engine.loading import load_engine
from sliceserve.engine.requests import SamplingParams
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.slicing.random_checkpoint import SHAPES, llama_spec, random_tensors, weight_shapes
from sliceserve.slicing.slicer import kept_width

TINY = SHAPES["tiny"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("random_checkpoint")
    build_tokenizer().save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def dense(folder) -> Path:
    out = folder / "dense"
    assert main(["export", "random:tiny", "--tokenizer", str(folder / "tokenizer"), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sliced(folder) -> Path:
    out = folder / "sliced"
    assert (
        main(
            [
                "export",
                "random:tiny",
                "--tokenizer",
                str(folder / "tokenizer"),
                "--out",
                str(out),
                "--sparsity",
                "0.25",
                "--dtype",
                "float32",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    return out


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    checkpoint = open_checkpoint(path)
    return {name: tuple(checkpoint.tensor(name).shape) for name in checkpoint.names}


def test_dense_export_has_the_shapes_widths_and_provenance_of_the_named_shape(dense):
    config = json.loads((dense / "config.json").read_text())
    assert config["dtype"] == "float16" and config["slicing"] is None
    assert config["source"] == {
        "model": "random:tiny",
        "model_type": "llama",
        "provenance": "random weights of tiny shapes, seed 0",
    }
    assert config["random"]["seed"] == 0 and config["random"]["sparsity"] == 0.0
    assert config["random"]["sizes"] == TINY
    model = load_model(dense)
    spec = model.spec
    assert (spec.original_width, spec.num_layers, spec.vocab_size) == (256, 2, 256)
    assert not spec.has_shortcuts and spec.embedding_width == spec.head_width == 256
    assert all((w.input_width, w.middle_width, w.output_width) == (256, 256, 256) for w in spec.layers)
    assert stored_shapes(dense) == weight_shapes(llama_spec("tiny"))
    assert not any("shortcut" in name for name in stored_shapes(dense))
    assert model.layers[0].mlp.gate.weight.dtype == torch.float16
    assert spec.eos_token_id == load_tokenizer(dense).eos_token_id  # <|im_end|>, id 2: inside the vocabulary


def test_sliced_export_keeps_the_slicers_widths_and_adds_random_shortcuts(sliced):
    kept = kept_width(256, 0.25, 8)
    assert kept == 192
    spec = load_model(sliced).spec
    assert spec.has_shortcuts and spec.embedding_width == spec.head_width == kept
    assert all((w.input_width, w.middle_width, w.output_width) == (kept, kept, kept) for w in spec.layers)
    shapes = stored_shapes(sliced)
    assert shapes == weight_shapes(llama_spec("tiny", 0.25))
    assert shapes["layers.1.attn_shortcut"] == shapes["layers.1.mlp_shortcut"] == (kept, kept)
    assert shapes["layers.0.attn.q.weight"] == (256, kept) and shapes["layers.0.mlp.down.weight"] == (kept, 512)
    assert shapes["embed.weight"] == shapes["head.weight"] == (256, kept)


def test_the_weights_are_the_seeded_draws_at_the_documented_scale(sliced):
    checkpoint = open_checkpoint(sliced)
    expected = dict(random_tensors(llama_spec("tiny", 0.25), dtype=torch.float32, device="cpu", seed=3))
    assert all(torch.equal(checkpoint.tensor(name), tensor) for name, tensor in expected.items())
    assert abs(float(checkpoint.tensor("embed.weight").std()) - 1.0) < 0.02  # N(0, 1)
    down = checkpoint.tensor("layers.0.mlp.down.weight")  # N(0, 1/512)
    assert abs(float(down.std()) * 512**0.5 - 1.0) < 0.02


@pytest.mark.parametrize("name", ["dense", "sliced"])
def test_logits_are_finite_and_the_engine_generates(name, request):
    path = request.getfixturevalue(name)
    model = load_model(path, dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([[5, 17, 200, 3]]))
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()
    engine = load_engine(path, max_batch=2, max_model_len=64, dtype=torch.float32)
    engine.start()
    try:
        events = list(engine.generate([5, 17, 200, 3], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
    finally:
        engine.shutdown()
    tokens = [t for event in events for t in event.token_ids]
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 6
    assert len(tokens) == 6 and all(0 <= t < 256 for t in tokens)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sliceserve: error:"), lines
    return lines[0]


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["random:llama-3-8b"],
            ["unknown random model shape 'llama-3-8b'", "llama-2-7b, llama-2-13b, llama-2-70b, tiny"],
        ),
        (["random:tiny", "--tokenizer", "{folder}/no-such-tokenizer"], ["tokenizer folder not found"]),
        (["random:tiny", "--tokenizer", "{folder}/tokenizer/tokenizer.json"], ["tokenizer folder not found"]),
        (["random:tiny"], ["needs --tokenizer"]),
        (["random:llama-2-7b", "--tokenizer", "{folder}/tokenizer"], ["300 tokens", "vocabulary of 32000"]),
        (["random:tiny", "--tokenizer", "{folder}/tokenizer", "--sparsity", "1"], ["--sparsity must be in [0, 1)"]),
        (["some/model", "--sparsity", "0.25"], ["--sparsity applies only to random:SHAPE"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, folder, argv, words):
    out = folder / "refused"
    argv = [a.format(folder=folder) for a in argv]
    line = one_line_error(capsys, ["export", *argv, "--out", str(out)])
    assert all(word in line for word in words), line
    assert not out.exists() and not list(folder.glob(".refused.partial-*"))


def test_the_installed_command_exits_2_on_an_unknown_shape(tmp_path):
    # The real entry point, in its own process: exit code and stderr as a shell sees them.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sliceserve",
            "export",
            "random:gpt-5",
            "--tokenizer",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "sliceserve: error: unknown random model shape 'gpt-5'; known: llama-2-7b, llama-2-13b, llama-2-70b, tiny"
    ]
