"""An interrupted write leaves nothing behind: SIGTERM while slicing removes the hidden staging
folder as Ctrl-C does (exit 130, one line), and the staging folders of runs that died without
cleaning up (killed -9, out of power) are removed by the next writer of the same folder.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_support import meaningful_lines, save_tiny_llama

from sliceserve.checkpoint import CheckpointWriter

WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat".split()


def dead_pid() -> int:
    """The id of a process that has just ended (no other can take it this soon)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_abandoned_staging_folders_are_removed_by_the_next_writer(tmp_path: Path):
    out = tmp_path / "out"
    abandoned = [tmp_path / f".out.partial-{dead_pid()}-0a1b2c3d4e5f", tmp_path / ".out.partial-0a1b2c3d4e5f"]
    kept = [tmp_path / f".out.partial-{os.getpid()}-0a1b2c3d4e5f", tmp_path / ".other.partial-0a1b2c3d4e5f"]
    for folder in abandoned + kept:
        folder.mkdir()
        (folder / "model-00001.safetensors").write_bytes(b"half")
    with CheckpointWriter(out) as writer:  # this process is alive: its own staging folder stays
        writer.add("x", torch.zeros(2))
        writer.finish({"note": "test"})
    assert not any(folder.exists() for folder in abandoned)
    assert all(folder.exists() for folder in kept)
    assert out.is_dir()


def test_sigterm_while_slicing_removes_the_staging_folder(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(2000))
    (tmp_path / "some.txt").write_text(text)
    model = tmp_path / "model"
    save_tiny_llama(model, text)
    torch.manual_seed(0)
    wide = LlamaConfig(  # wide enough that slicing takes a few seconds here: time to interrupt it
        hidden_size=384,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=200,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(wide).save_pretrained(model)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sliceserve", "slice", str(model), "--sparsity", "0.25"]
    command += ["--calibration", str(tmp_path / "some.txt"), "--nsamples", "16", "--seqlen", "64", "--out", str(out)]
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")):
        assert process.poll() is None and time.monotonic() < deadline, "slicing never began"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert meaningful_lines(stderr)[-1] == "sliceserve: interrupted (nothing was left half-written)"
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*")), "the staging folder was left behind"


def test_a_read_that_a_stop_request_broke_unwinds_as_the_stop(tmp_path: Path, monkeypatch):
    """A SIGTERM landing inside safetensors' read can surface as safetensors' own error (seen in CI:
    "could not determine the shape of object type 'torch.storage.UntypedStorage'"). While a stop
    was requested, the source raises the KeyboardInterrupt the command line unwinds on, not a read
    error of the file; otherwise the same failure stays a one-line error."""
    from sliceserve.errors import INTERRUPTED, SliceserveError
    from sliceserve.slicing.sources import FolderSource

    save_tiny_llama(tmp_path / "model", "some text " * 50)
    source = FolderSource(tmp_path / "model")
    name = next(iter(source.weight_map))
    handle = source.open(source.weight_map[name])

    class BrokenRead:
        def get_tensor(self, _name):
            raise TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    source.open_files[source.weight_map[name]] = BrokenRead()
    with pytest.raises(SliceserveError, match="cannot read tensor"):
        source.tensor(name)
    INTERRUPTED.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            source.tensor(name)
    finally:
        INTERRUPTED.clear()
    source.open_files[source.weight_map[name]] = handle
    assert source.tensor(name) is not None
