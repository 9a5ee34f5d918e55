"""Host values onto the GPU without waiting for it.

`torch.tensor(values, device="cuda")` copies from pageable memory, and PyTorch follows such a
copy with a synchronisation of the stream: the host waits for every kernel queued so far before
it can queue the next, so the GPU idles while the host catches up (the engine's decode-ahead
then gains nothing). A copy from pinned memory with `non_blocking` is ordered on
the stream like a kernel, and the caching host allocator keeps the pinned buffer until it ran.
"""

from __future__ import annotations

import torch


def upload(values, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device), without a synchronisation on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
