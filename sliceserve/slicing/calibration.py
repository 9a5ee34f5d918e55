"""Calibration text for slicing: WikiText-2, the user's files, or text the model generates.

Everything ends as batches of ``(tokens (b, T) int64, mask (b, T) bool)``. Sequences are
right-padded, so under causal attention real tokens never see padding; the mask only keeps
padding out of the slicing statistics.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch

from sliceserve.errors import SliceserveError

WIKITEXT2_FOLDER = "wikitext-2-raw"
_SPLIT_FILES = {"valid": "wiki.valid.raw", "test": "wiki.test.raw", "train": "wiki.train.raw"}
_REPO_ROOT = Path(__file__).resolve().parents[2]  # the parent of the sliceserve package


def _holds_wikitext2(folder: Path) -> bool:
    return (folder / "wiki.valid.raw").is_file() or (folder / "wiki.test.raw").is_file()


def find_wikitext2(data_dir: str | Path | None = None) -> Path:
    """The folder holding ``wiki.valid.raw`` / ``wiki.test.raw``.

    Looks in ``data_dir``, then ``$SLICESERVE_DATA_DIR`` (each either the folder itself or
    a parent holding ``wikitext-2-raw/``), then ``../shared/data/wikitext-2-raw`` from the
    current directory and from the repository root.
    """
    roots = [Path(d) for d in (data_dir, os.environ.get("SLICESERVE_DATA_DIR")) if d]
    candidates = [c for root in roots for c in (root, root / WIKITEXT2_FOLDER)]
    default = Path("..", "shared", "data", WIKITEXT2_FOLDER)
    candidates += [Path.cwd() / default, _REPO_ROOT / default]
    for folder in candidates:
        if _holds_wikitext2(folder):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise SliceserveError(
        f"WikiText-2 not found (looked in: {looked}); point at the folder holding "
        f"wiki.valid.raw and wiki.test.raw with --data-dir or SLICESERVE_DATA_DIR"
    )


def _hub_unresolvable() -> str | None:
    """Why the Hub cannot be reached, when its host name does not resolve (no proxy set): the
    `datasets` library would retry for about 25 s before saying so."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy resolves the name, not this machine
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as exc:
        return f"{host} cannot be resolved ({exc}): this machine seems to be offline"
    return None


def _rows_from_datasets(split: str) -> list[str]:
    """The Hugging Face copy of a split, or SliceserveError (no network: fails fast)."""
    try:
        import datasets
    except ImportError as exc:
        raise SliceserveError("the `datasets` package is not installed") from exc
    if not datasets.config.HF_HUB_OFFLINE and (offline := _hub_unresolvable()):
        raise SliceserveError(f"could not load wikitext-2-raw-v1 from Hugging Face: {offline}")
    hf_split = "validation" if split == "valid" else split
    try:
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"])
    except Exception as exc:  # offline, missing cache, ...: any failure means "not available"
        raise SliceserveError(f"could not load wikitext-2-raw-v1 from Hugging Face: {exc}") from exc


def wikitext2_text(split: str, data_dir: str | Path | None = None) -> str:
    """A WikiText-2 split as the paper reads it: the dataset rows joined with "\\n\\n".

    The Hugging Face rows are the file's lines, newline kept, with blank lines as "".
    """
    if split not in _SPLIT_FILES:
        raise SliceserveError(f"unknown WikiText-2 split {split!r}; use one of {sorted(_SPLIT_FILES)}")
    try:
        path = find_wikitext2(data_dir) / _SPLIT_FILES[split]
        if not path.is_file():
            raise SliceserveError(f"{path} does not exist")
    except SliceserveError as local_error:
        try:
            rows = _rows_from_datasets(split)
        except SliceserveError:
            raise local_error from None
    else:
        with open(path, encoding="utf-8") as f:
            rows = [line if line.strip() else "" for line in f]
    return "\n\n".join(rows)


def read_text_files(paths: list[str | Path]) -> str:
    """The files joined with "\\n\\n"; a folder stands for its *.txt and *.raw files, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".txt", ".raw") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise SliceserveError(f"calibration file {p} does not exist")
    if not files:
        raise SliceserveError(f"no .txt or .raw files in {', '.join(map(str, paths))}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def token_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random starts in a 1-D stream.

    A stream shorter than ``seqlen`` gives one window holding all of it.
    """
    token_ids = token_ids.reshape(-1).long()
    if token_ids.numel() == 0:
        raise SliceserveError("calibration text is empty (no tokens to calibrate on)")
    if token_ids.numel() <= seqlen:
        return token_ids[None, :seqlen].clone()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])


def calibration_batches(
    tokens: torch.Tensor, mask: torch.Tensor | None, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Splits (n, T) tokens and mask into batches; no mask means every token counts."""
    if mask is None:
        mask = torch.ones_like(tokens, dtype=torch.bool)
    return list(zip(tokens.split(batch_size), mask.bool().split(batch_size)))


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    # the whole text at once; tokenizers may warn that it exceeds the model's context
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def load_calibration(
    source: str,
    tokenizer,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    batch_size: int,
    data_dir: str | Path | None = None,
    model_loader: Callable[[], object] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration batches from ``source``: "wikitext2", "generated", or comma-separated paths.

    ``model_loader`` returns the dense runtime model; it is called only for "generated".
    """
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
        if value < 1:
            raise SliceserveError(f"calibration {name} must be at least 1, got {value}")
    if source == "generated":
        if model_loader is None:
            raise SliceserveError("generated calibration needs the model (no model_loader given)")
        from sliceserve.slicing.self_calibration import generated_token_windows

        tokens, mask = generated_token_windows(model_loader(), tokenizer, nsamples, seqlen, seed, batch_size)
        return calibration_batches(tokens, mask, batch_size)
    if source == "wikitext2":
        text = wikitext2_text("valid", data_dir)
    else:
        text = read_text_files([p.strip() for p in source.split(",") if p.strip()])
    windows = token_windows(_tokenize(tokenizer, text), nsamples, seqlen, seed)
    return calibration_batches(windows, None, batch_size)
