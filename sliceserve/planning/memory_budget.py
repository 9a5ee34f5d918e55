"""`--gpu-memory`: cap what the caching allocator may take on each card in use, so that a
24 GB card can be emulated on a larger one. The cap covers PyTorch's allocations only: the
CUDA context lives outside it (the planner's reserve stands for that)."""

from __future__ import annotations

import logging

import torch

from sliceserve.errors import SliceserveError
from sliceserve.planning.sizes import format_size

log = logging.getLogger("sliceserve")


def apply_memory_budget(devices: list[torch.device], budget: int) -> None:
    """Limit each distinct CUDA device to `budget` bytes; other devices only get a warning."""
    for device in dict.fromkeys(torch.device(d) for d in devices):
        if device.type != "cuda":
            log.warning("--gpu-memory has no effect on %s", device)
            continue
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        if budget > total:
            raise SliceserveError(f"--gpu-memory {format_size(budget)} exceeds cuda:{index}'s {format_size(total)}")
        torch.cuda.set_per_process_memory_fraction(budget / total, index)
