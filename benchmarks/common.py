"""What the benchmark scripts share: waiting for the GPU, the library versions every result
records, writing a result as JSON, relative errors and GPU timings."""

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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def gpu_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measured_copy_gbps() -> float:
    """The device's copy bandwidth (GB/s, read plus write), the roofline a decode step is held to."""
    n = 1 << 30  # 2 GiB of fp16 each way
    src = torch.randn(n // 2, device="cuda", dtype=torch.float16).repeat(2)
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * 2 * n / (ms / 1e3) / 1e9


def graph_ms(fn, inner: int = 50, repeats: int = 10) -> float:
    """Median milliseconds of one fn() call, replayed `inner` times from a CUDA graph (no launch gaps)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return gpu_ms(graph.replay, repeats=repeats) / inner
