"""A checkpoint whose config.json or index has been tampered with is refused when it is opened:
one line naming the field or the tensor, before any tensor is read or any cache allocated, and
`sliceserve generate` / `serve` end with `sliceserve: error: ...` and exit 2, never a traceback.

Each case is a copy of the tiny sliced checkpoint (two layers, widths 48 of 64, 4 heads of 16,
2 key/value heads, vocabulary 300) with one change.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_support import assert_one_line_error, run_sliceserve
from safetensors.torch import load_file, save_file
from server_support import checkpoint_path

from sliceserve.checkpoint import INDEX_FILE, open_checkpoint, sha256_of_file
from sliceserve.cli import main
from sliceserve.errors import SliceserveError

SHARD = "model-00001.safetensors"


def set_field(path: str, value) -> Callable[[dict], None]:
    """A change to the model description: `path` like "rope.theta" or "layers.0.input_width"."""

    def change(model: dict) -> None:
        *parents, last = path.split(".")
        target = model
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is DELETE:
            del target[last]
        else:
            target[int(last) if isinstance(target, list) else last] = value

    return change


DELETE = object()

# name: (change to config.json's "model", words the one-line error must hold)
CONFIG_CASES = {
    "negative-kv-heads": (set_field("num_kv_heads", -3), ["model.num_kv_heads", "-3"]),
    "huge-kv-heads-float": (set_field("num_kv_heads", 1e9), ["model.num_kv_heads", "integer"]),
    "kv-heads-not-dividing": (set_field("num_kv_heads", 3), ["model.num_kv_heads", "divide"]),
    "negative-heads": (set_field("num_heads", -9), ["model.num_heads"]),
    "zero-head-dim": (set_field("head_dim", 0), ["model.head_dim"]),
    "activation-not-known": (set_field("activation", "os.system"), ["model.activation", "silu"]),
    "null-rope-theta": (set_field("rope.theta", None), ["model.rope.theta", "null"]),
    "string-norm-eps": (set_field("norm_eps", "x"), ["model.norm_eps"]),
    "negative-norm-eps": (set_field("norm_eps", -1e-5), ["model.norm_eps"]),
    "absurd-layers": (set_field("num_layers", 100000), ["model.num_layers"]),
    "one-layer-too-many": (set_field("num_layers", 3), ["model.layers", "num_layers"]),
    "negative-width": (set_field("layers.0.input_width", -48), ["model.layers[0].input_width"]),
    "width-above-original": (set_field("layers.1.output_width", 80), ["model.layers[1].output_width", "64"]),
    "widths-do-not-chain": (set_field("layers.1.input_width", 40), ["model.layers[1].input_width", "output_width"]),
    "missing-middle-width": (set_field("layers.0.middle_width", DELETE), ["model.layers[0].middle_width", "missing"]),
    "huge-vocab-float": (set_field("vocab_size", 1e12), ["model.vocab_size"]),
    "huge-vocab": (set_field("vocab_size", 10**12), ["model.vocab_size"]),
    "vocab-not-the-tensors": (set_field("vocab_size", 1000), ["embed.weight", "[300, 48]", "[1000, 48]"]),
    "huge-positions": (set_field("max_positions", 10**30), ["model.max_positions"]),
    "odd-rotary-dim": (set_field("rope.rotary_dim", 15), ["model.rope.rotary_dim", "even"]),
    "rotary-dim-above-head-dim": (set_field("rope.rotary_dim", 32), ["model.rope.rotary_dim", "16"]),
    "unknown-rope-scaling": (set_field("rope.scaling_type", "yarn"), ["model.rope.scaling_type", "llama3"]),
    "unknown-rope-field": (set_field("rope.shift", 1), ["model.rope.shift"]),
    "string-bool": (set_field("gated_mlp", "yes"), ["model.gated_mlp", "true or false"]),
    "zero-sliding-window": (set_field("sliding_window", 0), ["model.sliding_window"]),
    "embedding-width-disagrees": (set_field("embedding_width", 40), ["model.embedding_width", "48"]),
    "eos-outside-vocab": (set_field("eos_token_id", 5000), ["model.eos_token_id", "300"]),
    "family-not-a-string": (set_field("family", 7), ["model.family"]),
    "layers-not-a-list": (set_field("layers", "lots"), ["model.layers"]),
    "width-as-string": (set_field("original_width", "64"), ["model.original_width"]),
    "more-heads-than-q-rows": (set_field("num_heads", 8), ["layers.0.attn.q.weight", "[64, 48]", "[128, 48]"]),
    "intermediate-disagrees": (set_field("intermediate_size", 100), ["mlp.gate.weight", "[100, 48]"]),
    "no-shortcuts-claimed": (set_field("has_shortcuts", False), ["attn_shortcut", "does not use"]),
    "learned-positions-missing": (set_field("rope", None), ["positions.weight", "lacks"]),
}


def without_tensor(name: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(name)


def reshaped(name: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)

    return change


def retyped(name: str, dtype: torch.dtype) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[name] = tensors[name].to(dtype)

    return change


def added(name: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[name] = torch.zeros(shape)

    return change


# name: (change to the shard's tensors, words the one-line error must hold)
TENSOR_CASES = {
    "missing-q": (without_tensor("layers.0.attn.q.weight"), ["layers.0.attn.q.weight", "lacks"]),
    "missing-head": (without_tensor("head.weight"), ["head.weight", "lacks"]),
    "missing-shortcut": (without_tensor("layers.1.mlp_shortcut"), ["layers.1.mlp_shortcut", "lacks"]),
    "wrong-shape": (reshaped("layers.1.mlp.up.weight", (128, 40)), ["layers.1.mlp.up.weight", "[128, 40]"]),
    "wrong-bias-shape": (added("layers.0.attn.q.bias", (63,)), ["layers.0.attn.q.bias", "[63]", "[64]"]),
    "extra-layer": (added("layers.2.attn.q.weight", (64, 48)), ["layers.2.attn.q.weight", "does not use"]),
    "integer-weights": (retyped("embed.weight", torch.int64), ["embed.weight", "floating point"]),
    "mixed-dtypes": (retyped("head.weight", torch.float16), ["several dtypes"]),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return checkpoint_path(tmp_path_factory)


def tampered_config(good: Path, folder: Path, change: Callable[[dict], None]) -> Path:
    shutil.copytree(good, folder)
    config = json.loads((folder / "config.json").read_text())
    change(config["model"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tampered_tensors(good: Path, folder: Path, change: Callable[[dict], None]) -> Path:
    """The shard rewritten with `change` applied, and the index to match (names and hash), so
    that only the description check can tell."""
    shutil.copytree(good, folder)
    tensors = load_file(folder / SHARD)
    change(tensors)
    save_file(tensors, folder / SHARD, metadata={"format": "pt"})
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"] = {name: SHARD for name in tensors}
    index["sha256"][SHARD] = sha256_of_file(folder / SHARD)
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def assert_refused(folder: Path, words: list[str], capsys) -> None:
    """Refused by open_checkpoint (headers only, nothing allocated), and by `generate` in one line."""
    with pytest.raises(SliceserveError) as caught:
        open_checkpoint(folder, verify=False)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    capsys.readouterr()
    assert main(["generate", str(folder), "hello", "--max-tokens", "2"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"sliceserve: error: {message}"]


def test_the_untouched_checkpoint_opens(good: Path):
    checkpoint = open_checkpoint(good)
    assert checkpoint.shapes["layers.0.attn.q.weight"] == ((64, 48), "F32")


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_tampered_config_is_refused(good: Path, tmp_path: Path, capsys, name: str):
    change, words = CONFIG_CASES[name]
    assert_refused(tampered_config(good, tmp_path / name, change), words, capsys)


@pytest.mark.parametrize("name", TENSOR_CASES)
def test_tampered_tensors_are_refused(good: Path, tmp_path: Path, capsys, name: str):
    change, words = TENSOR_CASES[name]
    assert_refused(tampered_tensors(good, tmp_path / name, change), words, capsys)


def test_no_model_description(good: Path, tmp_path: Path, capsys):
    folder = tmp_path / "no-model"
    shutil.copytree(good, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["model"]
    (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["generate", str(folder), "hello"]) == 2
    assert "lacks the model description" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_real_command_exits_with_one_line(good: Path, tmp_path: Path, command: str):
    """In a fresh process: `num_kv_heads: 1e9` once tried to allocate 4.7e15 bytes."""
    folder = tampered_config(good, tmp_path / "ck", set_field("num_kv_heads", 1e9))
    extra = ["hello"] if command == "generate" else ["--port", "0"]
    result = run_sliceserve(command, folder, *extra, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "model.num_kv_heads", "1000000000.0")
