"""The checkpoint folder: round trip, atomic writing, and one clear error per broken file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from sliceserve.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    CheckpointWriter,
    open_checkpoint,
    read_config,
)
from sliceserve.errors import SliceserveError


class FakeTokenizer:
    """Stands in for a Hugging Face tokenizer: only save_pretrained is used."""

    def save_pretrained(self, folder: str) -> None:
        Path(folder, "tokenizer.json").write_text('{"fake": true}')


def make_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 16),  # 4 KiB in float32, 2 KiB in 16-bit
        "layers.0.attn.weight": torch.randn(16, 16),
        "layers.0.mlp.weight": torch.randn(32, 16),
        "positions": torch.arange(10, dtype=torch.int64),
        "head.weight": torch.randn(64, 16),
    }


def write_checkpoint(out_dir: Path, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    tensors = make_tensors()
    with CheckpointWriter(out_dir, dtype=dtype, shard_bytes=3000) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.finish({"family": "llama", "hidden_size": 16}, tokenizer=FakeTokenizer())
    return tensors


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_over_several_shards_casts_floats_only(tmp_path: Path, dtype: torch.dtype):
    out_dir = tmp_path / "ckpt"
    tensors = write_checkpoint(out_dir, dtype)

    ckpt = open_checkpoint(out_dir)
    assert ckpt.names == list(tensors)
    assert ckpt.config["family"] == "llama"
    assert ckpt.config["format"] == FORMAT_NAME
    assert ckpt.config["format_version"] == FORMAT_VERSION
    for name, original in tensors.items():
        loaded = ckpt.tensor(name)
        if original.is_floating_point():
            assert loaded.dtype == dtype
            torch.testing.assert_close(loaded, original.to(dtype))
        else:
            assert loaded.dtype == torch.int64
            assert torch.equal(loaded, original)
    assert ckpt.has("head.weight") and not ckpt.has("missing")
    shards = sorted(out_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert ckpt.total_bytes == sum(p.stat().st_size for p in shards)
    assert siblings(out_dir) == ["ckpt"]  # no temporary folder left behind


def test_index_lists_every_tensor_and_correct_sha256(tmp_path: Path):
    out_dir = tmp_path / "ckpt"
    tensors = write_checkpoint(out_dir)

    index = json.loads((out_dir / INDEX_FILE).read_text())
    assert list(index["weight_map"]) == list(tensors)
    shard_files = sorted(set(index["weight_map"].values()))
    assert shard_files[0] == "model-00001.safetensors"
    assert sorted(index["sha256"]) == shard_files
    for shard_file, digest in index["sha256"].items():
        assert hashlib.sha256((out_dir / shard_file).read_bytes()).hexdigest() == digest
    # 16-bit floats (2 bytes) and the int64 tensor kept at 8 bytes.
    floats = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    assert index["metadata"]["total_size"] == 2 * floats + 8 * tensors["positions"].numel()


def test_tokenizer_and_config_are_saved(tmp_path: Path):
    out_dir = tmp_path / "ckpt"
    write_checkpoint(out_dir)
    assert json.loads((out_dir / "tokenizer.json").read_text()) == {"fake": True}
    assert read_config(out_dir)["hidden_size"] == 16


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_file_and_the_folder_follow_the_umask(tmp_path: Path, umask: int):
    # safetensors alone would write the shards with mode 0600, whatever the umask.
    previous = os.umask(umask)
    try:
        write_checkpoint(tmp_path / "ckpt")
    finally:
        os.umask(previous)
    folder = tmp_path / "ckpt"
    files = sorted(p for p in folder.iterdir())
    assert any(p.suffix == ".safetensors" for p in files) and (folder / "config.json") in files
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_shard_larger_than_limit_goes_alone_and_parents_are_created(tmp_path: Path):
    out_dir = tmp_path / "a" / "b" / "ckpt"
    with CheckpointWriter(out_dir, shard_bytes=100) as writer:
        writer.add("big", torch.zeros(1000))
        writer.add("small", torch.zeros(2))
        writer.finish({})
    index = json.loads((out_dir / INDEX_FILE).read_text())
    assert index["weight_map"] == {
        "big": "model-00001.safetensors",
        "small": "model-00002.safetensors",
    }


def test_duplicate_name_is_rejected(tmp_path: Path):
    with CheckpointWriter(tmp_path / "ckpt") as writer:
        writer.add("w", torch.zeros(2))
        with pytest.raises(ValueError, match="'w'"):
            writer.add("w", torch.ones(2))


def test_later_changes_to_an_added_tensor_are_not_saved(tmp_path: Path):
    weight = torch.zeros(4)
    with CheckpointWriter(tmp_path / "ckpt") as writer:
        writer.add("w", weight)
        writer.add("tied", weight)  # shares storage, as tied embeddings do
        weight.fill_(1.0)
        writer.finish({})
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert torch.equal(ckpt.tensor("w"), torch.zeros(4))
    assert torch.equal(ckpt.tensor("tied"), torch.zeros(4))


def test_exception_inside_with_leaves_nothing(tmp_path: Path):
    out_dir = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out_dir, shard_bytes=10) as writer:
            writer.add("a", torch.zeros(10))
            writer.add("b", torch.zeros(10))  # forces a shard onto disk first
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_leaving_with_without_finish_leaves_nothing(tmp_path: Path):
    with CheckpointWriter(tmp_path / "ckpt") as writer:
        writer.add("a", torch.zeros(10))
    assert list(tmp_path.iterdir()) == []


def test_non_empty_out_dir_without_overwrite_fails_before_writing(tmp_path: Path):
    out_dir = tmp_path / "ckpt"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    with pytest.raises(SliceserveError, match="not empty"):
        CheckpointWriter(out_dir)
    assert siblings(out_dir) == ["ckpt"]
    assert (out_dir / "keep.txt").read_text() == "mine"


def test_empty_out_dir_is_used_without_overwrite(tmp_path: Path):
    out_dir = tmp_path / "ckpt"
    out_dir.mkdir()
    write_checkpoint(out_dir)
    assert open_checkpoint(out_dir).names


def test_overwrite_replaces_only_at_finish(tmp_path: Path):
    out_dir = tmp_path / "ckpt"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    with CheckpointWriter(out_dir, overwrite=True) as writer:
        writer.add("w", torch.ones(3))
        assert (out_dir / "old.txt").exists()  # still intact while writing
        writer.finish({"new": True})
    assert not (out_dir / "old.txt").exists()
    assert read_config(out_dir)["new"] is True
    assert siblings(out_dir) == ["ckpt"]


# Each broken checkpoint must give one SliceserveError that names its problem.


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    out_dir = tmp_path / "ckpt"
    write_checkpoint(out_dir)
    return out_dir


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def first_shard(folder: Path) -> Path:
    return folder / "model-00001.safetensors"


def assert_one_line_error(match: str, func, *args, **kwargs) -> None:
    with pytest.raises(SliceserveError, match=match) as info:
        func(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_folder(tmp_path: Path):
    assert_one_line_error("not found", open_checkpoint, tmp_path / "nowhere")


def test_path_is_a_file(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error("not a folder", open_checkpoint, tmp_path / "file")


def test_no_config(ckpt_dir: Path):
    (ckpt_dir / "config.json").unlink()
    assert_one_line_error("no config.json", open_checkpoint, ckpt_dir)


def test_bad_json(ckpt_dir: Path):
    (ckpt_dir / "config.json").write_text("{not json")
    assert_one_line_error("not valid JSON", read_config, ckpt_dir)


def test_wrong_format(ckpt_dir: Path):
    edit_config(ckpt_dir, format="gguf")
    assert_one_line_error("not a sliceserve checkpoint", open_checkpoint, ckpt_dir)


def test_newer_format_version(ckpt_dir: Path):
    edit_config(ckpt_dir, format_version=99)
    assert_one_line_error(f"format_version 99.*reads format_version {FORMAT_VERSION}", open_checkpoint, ckpt_dir)


def test_missing_index(ckpt_dir: Path):
    (ckpt_dir / INDEX_FILE).unlink()
    assert_one_line_error(INDEX_FILE, open_checkpoint, ckpt_dir)


def test_missing_shard(ckpt_dir: Path):
    first_shard(ckpt_dir).unlink()
    assert_one_line_error("model-00001.safetensors .*missing", open_checkpoint, ckpt_dir)


def test_flipped_byte_fails_verification(ckpt_dir: Path):
    shard = first_shard(ckpt_dir)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # in the tensor data, so the header still parses
    shard.write_bytes(bytes(data))
    assert_one_line_error("corrupt or truncated", open_checkpoint, ckpt_dir)
    open_checkpoint(ckpt_dir, verify=False)  # header intact: only the hash can tell


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_shard(ckpt_dir: Path, verify: bool):
    shard = first_shard(ckpt_dir)
    shard.write_bytes(shard.read_bytes()[:-3])
    assert_one_line_error("corrupt or truncated", open_checkpoint, ckpt_dir, verify=verify)


def test_unknown_tensor_name(ckpt_dir: Path):
    assert_one_line_error("no tensor 'nope'", open_checkpoint(ckpt_dir).tensor, "nope")
