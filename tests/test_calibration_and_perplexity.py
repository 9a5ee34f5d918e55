"""Calibration data (WikiText-2 lookup, windows, generated text) and perplexity."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sliceserve.errors import SliceserveError
from sliceserve.perplexity import perplexity
from sliceserve.slicing import calibration
from sliceserve.slicing.calibration import (
    calibration_batches,
    find_wikitext2,
    load_calibration,
    read_text_files,
    token_windows,
    wikitext2_text,
)
from sliceserve.slicing.self_calibration import dense_runtime_model, generated_token_windows
from sliceserve.slicing.sources import FolderSource

TEST_LINES = [" \n", " = Title = \n", " \n", " First line of text . \n", " Second line . \n"]


def make_wikitext(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "wiki.test.raw").write_text("".join(TEST_LINES), encoding="utf-8")
    (folder / "wiki.valid.raw").write_text(" \n = Valid = \n a b c d e f g h \n", encoding="utf-8")
    return folder


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """Hide every default place, so only what a test sets up can be found."""
    monkeypatch.delenv("SLICESERVE_DATA_DIR", raising=False)
    monkeypatch.setattr(calibration, "_REPO_ROOT", tmp_path / "no-repo")
    monkeypatch.chdir(tmp_path)


# --- find_wikitext2 ---------------------------------------------------------------------


def test_find_via_argument_folder_or_parent(tmp_path, no_default_data):
    folder = make_wikitext(tmp_path / "data" / "wikitext-2-raw")
    assert find_wikitext2(folder) == folder
    assert find_wikitext2(str(tmp_path / "data")) == folder


def test_find_via_env(tmp_path, no_default_data, monkeypatch):
    folder = make_wikitext(tmp_path / "elsewhere" / "wikitext-2-raw")
    monkeypatch.setenv("SLICESERVE_DATA_DIR", str(tmp_path / "elsewhere"))
    assert find_wikitext2() == folder
    monkeypatch.setenv("SLICESERVE_DATA_DIR", str(folder))
    assert find_wikitext2() == folder


def test_find_default_relative_to_cwd(tmp_path, no_default_data, monkeypatch):
    folder = make_wikitext(tmp_path / "shared" / "data" / "wikitext-2-raw")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert find_wikitext2().resolve() == folder.resolve()


def test_find_default_relative_to_repo_root(tmp_path, no_default_data, monkeypatch):
    folder = make_wikitext(tmp_path / "shared" / "data" / "wikitext-2-raw")
    (tmp_path / "repo").mkdir()
    monkeypatch.setattr(calibration, "_REPO_ROOT", tmp_path / "repo")
    assert find_wikitext2().resolve() == folder.resolve()


def test_find_missing_names_places_and_remedy(tmp_path, no_default_data):
    with pytest.raises(SliceserveError) as err:
        find_wikitext2(tmp_path / "nothing-here")
    message = str(err.value)
    assert str(tmp_path / "nothing-here") in message
    assert "--data-dir" in message and "SLICESERVE_DATA_DIR" in message


def test_wikitext2_text_missing_fails_cleanly(tmp_path, no_default_data):
    with pytest.raises(SliceserveError, match="WikiText-2 not found"):
        wikitext2_text("test")


# --- text -------------------------------------------------------------------------------


def test_wikitext2_text_joins_rows_like_the_dataset(tmp_path, no_default_data):
    folder = make_wikitext(tmp_path / "wikitext-2-raw")
    text = wikitext2_text("test", data_dir=tmp_path)
    # rows: blank lines become "", others keep their newline; joined with "\n\n"
    assert text.startswith("\n\n = Title = \n\n\n\n\n First line of text . \n\n\n Second line . \n")
    assert text == "\n\n".join(["", " = Title = \n", "", " First line of text . \n", " Second line . \n"])
    assert wikitext2_text("valid", data_dir=folder).startswith("\n\n = Valid = \n")


def test_shared_wikitext2_test_split_starts_with_file():
    folder = find_wikitext2()  # CI has ../shared/data, as this machine does
    text = wikitext2_text("test")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert text.count("\n\n") > 1000
    assert (folder / "wiki.test.raw").is_file()


def test_read_text_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "a.raw").write_text("ay")
    (tmp_path / "d" / "skip.json").write_text("{}")
    (tmp_path / "c.txt").write_text("sea")
    assert read_text_files([tmp_path / "d", str(tmp_path / "c.txt")]) == "ay\n\nbee\n\nsea"
    with pytest.raises(SliceserveError, match="does not exist"):
        read_text_files([tmp_path / "missing.txt"])


# --- windows and batches ----------------------------------------------------------------


def test_token_windows_shape_and_seed():
    stream = torch.arange(1000)
    windows = token_windows(stream, nsamples=8, seqlen=16, seed=0)
    assert windows.shape == (8, 16) and windows.dtype == torch.int64
    # each window is a contiguous slice of the stream
    assert torch.equal(windows - windows[:, :1], torch.arange(16).expand(8, 16))
    assert torch.equal(windows, token_windows(stream, 8, 16, seed=0))
    assert not torch.equal(windows, token_windows(stream, 8, 16, seed=1))


def test_token_windows_short_and_empty():
    assert torch.equal(token_windows(torch.arange(5), nsamples=4, seqlen=16, seed=0), torch.arange(5)[None])
    with pytest.raises(SliceserveError, match="calibration text is empty"):
        token_windows(torch.tensor([], dtype=torch.long), 4, 16, 0)


def test_calibration_batches_masks():
    tokens = torch.arange(30).reshape(5, 6)
    batches = calibration_batches(tokens, None, batch_size=2)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert all(m.dtype == torch.bool and m.all() for _, m in batches)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[3, 4:] = False
    batches = calibration_batches(tokens, mask, batch_size=2)
    assert torch.equal(torch.cat([m for _, m in batches]), mask)
    assert torch.equal(torch.cat([t for t, _ in batches]), tokens)


class CharTokenizer:
    """Each character is a token; enough for load_calibration."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_load_calibration_from_files_and_wikitext(tmp_path, no_default_data):
    (tmp_path / "a.txt").write_text("x" * 100)
    batches = load_calibration(str(tmp_path / "a.txt"), CharTokenizer(), nsamples=3, seqlen=10, seed=0, batch_size=2)
    assert [t.shape for t, _ in batches] == [(2, 10), (1, 10)]
    make_wikitext(tmp_path / "wikitext-2-raw")
    batches = load_calibration(
        "wikitext2", CharTokenizer(), nsamples=2, seqlen=8, seed=0, batch_size=4, data_dir=tmp_path
    )
    assert batches[0][0].shape == (2, 8)
    with pytest.raises(SliceserveError, match="nsamples"):
        load_calibration("wikitext2", CharTokenizer(), nsamples=0, seqlen=8, seed=0, batch_size=4)


# --- perplexity -------------------------------------------------------------------------

VOCAB = 5
BIGRAM = torch.tensor([[(3 * i + 5 * j) % 7 - 3.0 for j in range(VOCAB)] for i in range(VOCAB)])


def bigram_logits(batch: torch.Tensor) -> torch.Tensor:
    return BIGRAM[batch].to(torch.bfloat16).float()


def expected_nll(windows: list[list[int]]) -> tuple[float, int]:
    """Sum of -log p(next | current) under the bigram table, written with plain loops."""
    total, count = 0.0, 0
    for window in windows:
        for current, following in zip(window[:-1], window[1:]):
            row = [float(x) for x in BIGRAM[current].to(torch.bfloat16).float()]
            log_z = math.log(sum(math.exp(x) for x in row))
            total += log_z - row[following]
            count += 1
    return total, count


def test_perplexity_matches_hand_computed_bigram():
    tokens = torch.tensor([(7 * i * i + i) % VOCAB for i in range(50)])
    result = perplexity(bigram_logits, tokens, seqlen=8, batch_size=3, progress=False)
    windows = [tokens[w * 8 : (w + 1) * 8].tolist() for w in range(6)]  # 50 // 8 = 6, remainder dropped
    total, count = expected_nll(windows)
    assert result["windows"] == 6 and result["tokens"] == count == 6 * 7
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-12)


def test_perplexity_max_windows_and_too_short():
    tokens = torch.tensor([i % VOCAB for i in range(40)])
    result = perplexity(bigram_logits, tokens, seqlen=8, max_windows=2, progress=False)
    total, count = expected_nll([tokens[:8].tolist(), tokens[8:16].tolist()])
    assert result["windows"] == 2 and result["tokens"] == 14
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-12)
    with pytest.raises(SliceserveError, match=r"7 tokens.*seqlen=8"):
        perplexity(bigram_logits, tokens[:7], seqlen=8, progress=False)


# --- generated calibration text ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama as our runtime's dense model (norms fused, in memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return dense_runtime_model(FolderSource(folder))


# A stand-in for a tokenizer: the sampler needs its special ids, and decode for the engine's text.
TOKENIZER = SimpleNamespace(
    bos_token_id=1, eos_token_id=2, pad_token_id=0, decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids))
)


def test_generated_token_windows(tiny_llama):
    tokens, mask = generated_token_windows(
        tiny_llama, TOKENIZER, nsamples=12, seqlen=24, seed=3, batch_size=5, progress=False
    )
    assert tokens.shape == mask.shape == (12, 24)
    assert tokens.dtype == torch.int64 and mask.dtype == torch.bool
    assert (tokens[:, 0] == 1).all()
    for row, row_mask in zip(tokens.tolist(), mask.tolist()):
        eos_at = [i for i, t in enumerate(row) if t == 2 and i > 0]
        real = eos_at[0] + 1 if eos_at else 24
        assert row_mask == [True] * real + [False] * (24 - real)
        assert all(t == 0 for t in row[real:])
    again, again_mask = generated_token_windows(tiny_llama, TOKENIZER, 12, 24, seed=3, batch_size=5, progress=False)
    assert torch.equal(tokens, again) and torch.equal(mask, again_mask)
    other, _ = generated_token_windows(tiny_llama, TOKENIZER, 12, 24, seed=4, batch_size=5, progress=False)
    assert not torch.equal(tokens, other)


def test_generated_mask_after_early_eos(tiny_llama):
    # raise the EOS logit so that rows stop early and the mask check means something
    eos_boost = torch.zeros(64)
    eos_boost[2] = 3.0
    hook = tiny_llama.head.register_forward_hook(lambda module, args, out: out + eos_boost)
    try:
        tokens, mask = generated_token_windows(tiny_llama, TOKENIZER, 8, 16, seed=0, batch_size=8, progress=False)
    finally:
        hook.remove()
    assert (~mask).any(), "expected at least one early EOS"
    for row, row_mask in zip(tokens.tolist(), mask.tolist()):
        if 2 in row[1:]:
            stop = row.index(2, 1)
            assert all(row_mask[: stop + 1]) and not any(row_mask[stop + 1 :])
        else:
            assert all(row_mask)


def test_load_calibration_generated_loads_model_only_when_needed(tiny_llama, tmp_path):
    calls = []

    def loader():
        calls.append(1)
        return tiny_llama

    (tmp_path / "a.txt").write_text("y" * 50)
    load_calibration(
        str(tmp_path / "a.txt"), CharTokenizer(), nsamples=1, seqlen=4, seed=0, batch_size=1, model_loader=loader
    )
    assert calls == []
    batches = load_calibration("generated", TOKENIZER, nsamples=3, seqlen=6, seed=0, batch_size=2, model_loader=loader)
    assert calls == [1] and [t.shape for t, _ in batches] == [(2, 6), (1, 6)]


def test_generated_text_starts_in_the_chat_format_when_there_is_a_template(tmp_path):
    from server_support import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from sliceserve.slicing.self_calibration import chat_prefix_ids

    tokenizer = build_tokenizer()
    prefix = chat_prefix_ids(tokenizer)
    assert tokenizer.decode(prefix) == "<|im_start|>user\n"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = dense_runtime_model(FolderSource(tmp_path))
    tokens, mask = generated_token_windows(
        model, tokenizer, nsamples=3, seqlen=16, seed=0, batch_size=3, progress=False
    )
    assert tokens[:, : len(prefix)].tolist() == [prefix] * 3
    assert mask.all()  # end-of-turn tokens do not end chat-format samples


def test_no_chat_prefix_without_a_template():
    from sliceserve.slicing.self_calibration import chat_prefix_ids

    assert chat_prefix_ids(TOKENIZER) is None
