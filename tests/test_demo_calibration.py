"""The demo's calibration text is sampled once per model and size, then read from the cache.

A real tiny Llama with a tokenizer samples the text (our engine over its dense runtime model):
the cache function calls its model loader only when no file holds the same key (source,
nsamples, seqlen, seed), and resamples over a file that is truncated or holds another key. The
demo's own path, run twice on that model at two sparsities, samples once: the second slice
reads the file the first wrote (same inode, same modification time), and a distilled demo
checkpoint reuses it too.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_support import save_tiny_llama

from sliceserve.commands.serving import DEMO_DTYPE, demo_checkpoint_name, make_demo_checkpoint
from sliceserve.model.loader import load_model
from sliceserve.slicing.self_calibration import cached_generated_windows, dense_runtime_model
from sliceserve.slicing.sources import FolderSource

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on the mat and the dog ran to the park while birds sang in old trees".split()
KEY = {"source": "tiny", "nsamples": 4, "seqlen": 16, "seed": 42}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> FolderSource:
    folder = tmp_path_factory.mktemp("demo-cache") / "tiny"
    save_tiny_llama(folder, " ".join(WORDS * 40))
    return FolderSource(folder)


class CountingLoader:
    """The dense runtime model, counting how often sampling needed it."""

    def __init__(self, source: FolderSource):
        self.source, self.calls = source, 0

    def __call__(self):
        self.calls += 1
        return dense_runtime_model(self.source)


def test_the_text_is_sampled_once_per_key(source, tmp_path):
    cache_file, loader = tmp_path / "text.safetensors", CountingLoader(source)
    tokens, mask = cached_generated_windows(cache_file, KEY, loader, source.tokenizer(), progress=False)
    assert loader.calls == 1 and cache_file.is_file() and tokens.shape == (4, 16)
    again, again_mask = cached_generated_windows(cache_file, KEY, loader, source.tokenizer(), progress=False)
    assert loader.calls == 1 and torch.equal(again, tokens) and torch.equal(again_mask, mask)
    other = cached_generated_windows(cache_file, {**KEY, "seed": 7}, loader, source.tokenizer(), progress=False)
    assert loader.calls == 2 and not torch.equal(other[0], tokens)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left


def test_a_truncated_cache_file_is_sampled_again(source, tmp_path):
    cache_file, loader = tmp_path / "text.safetensors", CountingLoader(source)
    tokens, _ = cached_generated_windows(cache_file, KEY, loader, source.tokenizer(), progress=False)
    cache_file.write_bytes(cache_file.read_bytes()[:40])
    again, _ = cached_generated_windows(cache_file, KEY, loader, source.tokenizer(), progress=False)
    assert loader.calls == 2 and torch.equal(again, tokens)


def test_the_demo_samples_once_for_every_sparsity_and_for_its_distillation(source, tmp_path, monkeypatch):
    monkeypatch.setenv("SLICESERVE_CACHE", str(tmp_path))
    size = dict(nsamples=4, seqlen=16)
    first = make_demo_checkpoint(
        source, "tiny", tmp_path / demo_checkpoint_name("tiny", 0.25, 0), sparsity=0.25, recover_steps=0, **size
    )
    (cache_file,) = (tmp_path / "calibration").iterdir()
    assert cache_file.name == "tiny-generated-4x16-seed42.safetensors"
    written = cache_file.stat()
    second = make_demo_checkpoint(
        source, "tiny", tmp_path / demo_checkpoint_name("tiny", 0.5, 0), sparsity=0.5, recover_steps=0, **size
    )
    distilled = make_demo_checkpoint(
        source, "tiny", tmp_path / demo_checkpoint_name("tiny", 0.5, 2), sparsity=0.5, recover_steps=2, **size
    )
    read = cache_file.stat()
    assert (read.st_ino, read.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # not sampled again
    configs = [json.loads((path / "config.json").read_text()) for path in (first, second, distilled)]
    assert len({c["slicing"]["calibration_tokens"] for c in configs}) == 1
    assert configs[0]["model"] != configs[1]["model"] and configs[1]["model"] == configs[2]["model"]
    assert all(c["dtype"] == DEMO_DTYPE for c in configs)
    assert configs[2]["finetuning"]["objective"] == "distillation" and configs[2]["finetuning"]["steps"] == 2
    assert distilled.name == "tiny-sliced-50-distilled-2" and load_model(distilled).spec == load_model(second).spec
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_the_demo_options_hold_every_option_the_command_line_gives_the_demo():
    """`add_demo_options` (with --recover-steps) is meant to replace the demo's options in cli.py."""
    import argparse

    from sliceserve.cli import build_parser
    from sliceserve.commands.options import DEMO_RECOVER_STEPS, DEMO_SPARSITY, add_demo_options

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    ours = argparse.ArgumentParser()
    add_demo_options(ours)
    defaults = {action.dest: action.default for action in ours._actions}
    assert {action.dest: action.default for action in demo._actions}.items() <= defaults.items()
    assert (defaults["sparsity"], defaults["recover_steps"]) == (DEMO_SPARSITY, DEMO_RECOVER_STEPS)
