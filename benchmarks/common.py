"""What the benchmark scripts share: waiting for the GPU, the library versions every result
records, and writing a result as JSON."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def sync(*devices: str | torch.device) -> None:
    """Wait for the queued work of every CUDA device named (the current one when none is)."""
    if not devices and torch.cuda.is_available():
        torch.cuda.synchronize()
    for device in {torch.device(d) for d in devices}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def versions() -> dict[str, str | None]:
    """torch (and its CUDA), Triton, Transformers and Python, as a result's conditions."""
    found: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def write_json(path: Path, data: dict, indent: int = 2) -> None:
    path.write_text(json.dumps(data, indent=indent) + "\n")
