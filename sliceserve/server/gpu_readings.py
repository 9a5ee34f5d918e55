"""The GPU samples of /metrics when the engine runs in its own process: NVML and the allocator's
figures are read where the CUDA context lives, the child, and relayed with its counters."""

from __future__ import annotations

from sliceserve.server.metrics import Exposition, GPUProbe


class GPUReadings:
    """Called in the engine's process for each stats reply: its GPUs' /metrics lines (none on a
    CPU). Picklable, so that it travels to the child with its start."""

    def __init__(self) -> None:
        self.probe: GPUProbe | None = None  # made in the child, on the first call

    def __call__(self) -> list[str]:
        if self.probe is None:
            self.probe = GPUProbe()
        out = Exposition()
        self.probe.render(out)
        return out.lines
