"""The sliceserve checkpoint: a folder of safetensors shards, an index and a config.

Layout::

    config.json                     the caller's config plus "format" and "format_version"
    model-00001.safetensors, ...    tensors, each shard at most about ``shard_bytes``
    model.safetensors.index.json    {"metadata": {"total_size"}, "weight_map", "sha256"}
    tokenizer files                 whatever ``tokenizer.save_pretrained`` writes
    *_sliceserve.py                 the writers add the Transformers modelling code (hf_modeling/)

The writer streams tensors into shards (the slicer pushes a 70B model through it
layer by layer), builds everything in a hidden sibling folder and renames it into
place at the end, so a crash or an exception never leaves a half-written checkpoint
where a reader would find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sliceserve.errors import SliceserveError
from sliceserve.model.quant_format import quant_format
from sliceserve.model.spec import DecoderSpec
from sliceserve.model.spec_checks import check_model_description, check_tensors

FORMAT_NAME = "sliceserve"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
_HASH_CHUNK_BYTES = 16 * 2**20


class CheckpointWriter:
    """Writes a checkpoint shard by shard; use as a context manager, then call ``finish``."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        dtype: torch.dtype | None = None,
        shard_bytes: int = 2 * 2**30,
        overwrite: bool = False,
    ) -> None:
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        self.out_dir = Path(os.path.abspath(out_dir))
        self.dtype = dtype
        self.shard_bytes = shard_bytes
        self.overwrite = overwrite
        # Checked now, before the caller spends hours slicing, and again in finish().
        check_destination(self.out_dir, overwrite)

        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_staging(self.out_dir)
        # A sibling, so the final rename stays on one filesystem and is atomic; named with our
        # process id, so that a later run can tell it from one still being written.
        # os.mkdir (not mkdtemp) so the folder gets the user's umask, not 0o700.
        staging_name = f".{self.out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(6)}"
        self.staging_dir = self.out_dir.with_name(staging_name)
        os.mkdir(self.staging_dir)

        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._weight_map: dict[str, str] = {}
        self._sha256: dict[str, str] = {}
        self._total_size = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes the current shard first if this one would overflow it."""
        if self._closed:
            raise RuntimeError("CheckpointWriter is already finished or aborted")
        if name in self._weight_map or name in self._buffer:
            raise ValueError(f"tensor {name!r} was already added")
        stored = self._prepare(tensor)
        nbytes = stored.numel() * stored.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.shard_bytes:
            self._flush()
        self._buffer[name] = stored
        self._buffer_bytes += nbytes

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor added so far, in the order added."""
        return [*self._weight_map, *self._buffer]

    def finish(self, config: dict[str, Any], tokenizer: Any = None) -> Path:
        """Write the last shard, index, config and tokenizer, then move the folder into place."""
        if self._closed:
            raise RuntimeError("CheckpointWriter is already finished or aborted")
        try:
            self._flush()
            # Tokenizer first, so our own config.json and index win any name clash.
            if tokenizer is not None:
                tokenizer.save_pretrained(str(self.staging_dir))
            index = {
                "metadata": {"total_size": self._total_size},
                "weight_map": self._weight_map,
                "sha256": self._sha256,
            }
            _write_json(self.staging_dir / INDEX_FILE, index)
            caller_keys = {k: v for k, v in config.items() if k not in ("format", "format_version")}
            full_config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **caller_keys}
            _write_json(self.staging_dir / CONFIG_FILE, full_config)
            _fsync(self.staging_dir)
            _move_into_place(self.staging_dir, self.out_dir, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far; safe to call more than once."""
        self._closed = True
        self._buffer.clear()
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception, or on leaving without finish(), nothing is kept.
        if not self._closed:
            self.abort()

    def _prepare(self, tensor: torch.Tensor) -> torch.Tensor:
        cast = self.dtype is not None and tensor.is_floating_point()  # integers keep their type
        dtype = self.dtype if cast else tensor.dtype
        stored = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        # Own the memory: the caller may modify its tensor later, and safetensors
        # refuses tensors that share storage (tied embeddings, slices of one weight).
        if stored.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            stored = stored.clone()
        return stored

    def _flush(self) -> None:
        if not self._buffer:
            return
        shard_file = f"model-{len(self._sha256) + 1:05d}.safetensors"
        shard_path = self.staging_dir / shard_file
        save_file(self._buffer, str(shard_path), metadata={"format": "pt"})
        # safetensors creates its files with mode 0600; give shards the mode every other file
        # of the checkpoint has (the umask's), which the staging folder was created with.
        os.chmod(shard_path, stat.S_IMODE(os.stat(self.staging_dir).st_mode) & 0o666)
        _fsync(shard_path)
        self._sha256[shard_file] = sha256_of_file(shard_path)
        for name in self._buffer:
            self._weight_map[name] = shard_file
        self._total_size += self._buffer_bytes
        self._buffer = {}
        self._buffer_bytes = 0


@dataclass
class Checkpoint:
    """An opened checkpoint; tensors are read from their shard only when asked for."""

    path: Path
    config: dict[str, Any]
    names: list[str]
    total_bytes: int  # sum of shard file sizes
    weight_map: dict[str, str] = field(repr=False)
    shapes: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict, repr=False)  # name: (shape, dtype)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name not in self.weight_map:
            raise SliceserveError(f"checkpoint {self.path} has no tensor {name!r}")
        shard_path = self.path / self.weight_map[name]
        try:
            with safe_open(str(shard_path), framework="pt", device=str(device)) as shard:
                return shard.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise SliceserveError(f"cannot read {name!r} from {shard_path}: {err}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The config of a sliceserve checkpoint, after checking its format and version."""
    path = Path(path)
    if not path.exists():
        raise SliceserveError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise SliceserveError(f"checkpoint path is not a folder: {path}")
    if not (path / CONFIG_FILE).is_file():
        raise SliceserveError(f"no {CONFIG_FILE} in {path}: not a sliceserve checkpoint")
    config = _read_json(path / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise SliceserveError(f'{path} is not a sliceserve checkpoint (config.json lacks "format": "{FORMAT_NAME}")')
    version = config.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        is_newer = type(version) is int and version > FORMAT_VERSION
        newer = " (newer than this sliceserve; upgrade it)" if is_newer else ""
        raise SliceserveError(
            f"{path} has checkpoint format_version {version!r}{newer}; "
            f"this sliceserve reads format_version {FORMAT_VERSION}"
        )
    return config


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a folder holding one of our checkpoints (not a model to convert)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == "sliceserve"
    except (json.JSONDecodeError, AttributeError):
        return False


def checkpoint_spec(config: dict, source: str = "config.json") -> DecoderSpec:
    """The decoder a checkpoint's config.json describes, after checking every field of it."""
    if not isinstance(config, dict) or "model" not in config:
        raise SliceserveError(f'{source} lacks the model description (its "model" object)')
    check_model_description(config["model"], source)
    return DecoderSpec.from_dict(config["model"])


def open_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint, checking every shard is present and readable, and, where config.json
    describes a model, every field of the description and every tensor's presence and shape
    (from the shards' headers: nothing large is read or allocated).

    ``verify`` also compares each shard's sha256 with the index; it reads every byte,
    which takes minutes for a 70B model, hence the switch.
    """
    path = Path(path)
    config = read_config(path)
    # A bare container (no model description) is the writer's own business.
    spec = checkpoint_spec(config, str(path / CONFIG_FILE)) if "model" in config else None
    if not (path / INDEX_FILE).is_file():
        raise SliceserveError(f"checkpoint {path} has no {INDEX_FILE} (incomplete checkpoint?)")
    index = _read_json(path / INDEX_FILE)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    hashes = index.get("sha256", {}) if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(hashes, dict):
        raise SliceserveError(f'{path / INDEX_FILE} has no valid "weight_map" and "sha256"')

    names_by_shard: dict[str, list[str]] = {}
    for name, shard_file in weight_map.items():
        # A bare file name only: an index must not point outside its folder.
        if not isinstance(shard_file, str) or Path(shard_file).name != shard_file:
            raise SliceserveError(f"{path / INDEX_FILE} maps {name!r} to an invalid shard {shard_file!r}")
        names_by_shard.setdefault(shard_file, []).append(name)

    total_bytes, shapes = 0, {}
    for shard_file, names in names_by_shard.items():
        shard_path = path / shard_file
        if not shard_path.is_file():
            raise SliceserveError(f"shard {shard_file} listed in the index is missing from {path}")
        total_bytes += shard_path.stat().st_size
        shapes.update(_check_shard_holds(shard_path, names))
    if spec is not None:
        check_tensors(spec, shapes, str(path / INDEX_FILE), quant_format(config))
    for shard_file in names_by_shard if verify else ():  # last: it reads every byte
        expected = hashes.get(shard_file)
        if expected is None:
            raise SliceserveError(f"{path / INDEX_FILE} has no sha256 for shard {shard_file}")
        if sha256_of_file(path / shard_file) != expected:
            raise SliceserveError(f"shard {path / shard_file} is corrupt or truncated (sha256 differs from the index)")

    return Checkpoint(
        path=path,
        config=config,
        names=list(weight_map),
        total_bytes=total_bytes,
        weight_map=weight_map,
        shapes=shapes,
    )


def sha256_of_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks: shards are gigabytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_shard_holds(shard_path: Path, names: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shape and dtype of each of `names`, from the shard's header."""
    # Opening reads only the header, and safetensors checks the header against the
    # file size: this catches a truncated shard cheaply even without verify.
    try:
        with safe_open(str(shard_path), framework="pt", device="cpu") as shard:
            present = set(shard.keys())
            missing = [name for name in names if name not in present]
            if missing:
                raise SliceserveError(
                    f"shard {shard_path} lacks {len(missing)} tensor(s) the index lists, e.g. {missing[0]!r}"
                )
            slices = {name: shard.get_slice(name) for name in names}
            return {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
    except (SafetensorError, OSError) as err:
        raise SliceserveError(f"shard {shard_path} is corrupt or truncated: {err}") from None


def remove_abandoned_staging(out_dir: Path) -> None:
    """Remove the staging folders of `out_dir` left by runs that died without cleaning up
    (killed, or out of power): those whose process is gone, and those of older versions,
    whose names carry no process id."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.partial-(?:(\d+)-)?[0-9a-f]+")
    for sibling in out_dir.parent.iterdir():
        found = pattern.fullmatch(sibling.name)
        if found and sibling.is_dir() and not (found.group(1) and process_alive(int(found.group(1)))):
            shutil.rmtree(sibling, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's
    return True


def check_destination(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SliceserveError(f"output path exists and is not a folder: {out_dir}")
    if not overwrite and any(out_dir.iterdir()):
        raise SliceserveError(
            f"output folder {out_dir} already exists and is not empty (use --overwrite to replace it)"
        )


def _move_into_place(staging_dir: Path, out_dir: Path, overwrite: bool) -> None:
    check_destination(out_dir, overwrite)  # someone may have written there meanwhile
    if not out_dir.exists():
        os.rename(staging_dir, out_dir)
    else:
        # Move the old folder aside rather than deleting it first, so a failure
        # between the two renames can put it back.
        old_dir = out_dir.with_name(f".{out_dir.name}.old-{secrets.token_hex(6)}")
        os.rename(out_dir, old_dir)
        try:
            os.rename(staging_dir, out_dir)
        except BaseException:
            os.rename(old_dir, out_dir)
            raise
        if old_dir.is_symlink():
            old_dir.unlink()
        else:
            shutil.rmtree(old_dir, ignore_errors=True)
    _fsync(out_dir.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise SliceserveError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise SliceserveError(f"cannot read {path}: {err.strerror}") from None


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    _fsync(path)


def _fsync(path: Path) -> None:
    # Data must reach the disk before the rename publishes it, or a power cut can
    # leave a complete-looking folder of empty files.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
