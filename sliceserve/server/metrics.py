"""GET /metrics: the engine's counters, the server's answers and the GPUs, in Prometheus'
text format (version 0.0.4)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from sliceserve.engine.stats import EngineStats, Histogram

PREFIX = "sliceserve"


class ResponseCounter:
    """HTTP answers by route and status, counted by the server's middleware."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, int]] = Counter()

    def count(self, route: str, status: int) -> None:
        with self.lock:
            self.counts[route, status] += 1

    def snapshot(self) -> dict[tuple[str, int], int]:
        with self.lock:
            return dict(self.counts)


def labels(**values: Any) -> str:
    if not values:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(values, escaped)) + "}"


def number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Exposition:
    """Lines of the text format, one HELP and TYPE header per metric family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> str:
        full = f"{PREFIX}_{name}"
        self.lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        return full

    def sample(self, name: str, value: float, **label_values: Any) -> None:
        self.lines.append(f"{name}{labels(**label_values)} {number(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.sample(self.family(name, kind, help_text), value)

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        full = self.family(name, "histogram", help_text)
        for bound, count in zip(histogram.buckets, histogram.counts):
            self.sample(f"{full}_bucket", count, le=number(float(bound)))
        self.sample(f"{full}_bucket", histogram.count, le="+Inf")
        self.sample(f"{full}_sum", histogram.total)
        self.sample(f"{full}_count", histogram.count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def copy_histogram(h: Histogram) -> Histogram:
    out = Histogram(h.buckets)
    out.counts, out.total, out.count = list(h.counts), h.total, h.count
    return out


def engine_metrics(out: Exposition, stats: EngineStats) -> None:
    with stats.lock:  # copy under the lock, render outside it
        finished = dict(stats.finished)
        prompt_tokens, generation_tokens = stats.prompt_tokens, stats.generation_tokens
        ttft, itl, latency = (
            copy_histogram(h) for h in (stats.time_to_first_token, stats.inter_token_latency, stats.request_latency)
        )
        running, waiting = stats.running, stats.waiting
        slots_used, slots_total, kv_bytes = stats.kv_slots_used, stats.kv_slots_total, stats.kv_cache_bytes
        blocks_used, blocks_total, preemptions = stats.kv_blocks_used, stats.kv_blocks_total, stats.preemptions
        prefix_hits = stats.prefix_cache_hit_tokens
    name = out.family("requests_finished_total", "counter", "Generation requests finished, by reason.")
    for reason in sorted(set(finished) | {"stop", "length", "cancelled", "error"}):
        out.sample(name, finished.get(reason, 0), reason=reason)
    out.single("prompt_tokens_total", "counter", "Prompt tokens processed.", prompt_tokens)
    out.single("generation_tokens_total", "counter", "Tokens generated.", generation_tokens)
    out.histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.", ttft)
    out.histogram("inter_token_latency_seconds", "Time between consecutive tokens of a request.", itl)
    out.histogram("request_latency_seconds", "Time from arrival to the last token.", latency)
    out.single("requests_running", "gauge", "Requests holding a batch slot.", running)
    out.single("requests_waiting", "gauge", "Requests waiting in the queue.", waiting)
    out.single("kv_cache_slots_used", "gauge", "KV cache slots in use.", slots_used)
    out.single("kv_cache_slots_total", "gauge", "KV cache slots in all.", slots_total)
    out.single(
        "kv_cache_usage_ratio",
        "gauge",
        "Fraction of the KV cache's blocks in use.",
        blocks_used / blocks_total if blocks_total else 0.0,
    )
    out.single("kv_cache_blocks_used", "gauge", "KV cache blocks (of positions) in use.", blocks_used)
    out.single("kv_cache_blocks_total", "gauge", "KV cache blocks in all.", blocks_total)
    out.single("preemptions_total", "counter", "Requests preempted for want of cache blocks.", preemptions)
    out.single(
        "prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the KV cache, not computed.", prefix_hits
    )
    out.single("kv_cache_bytes", "gauge", "Bytes the KV cache holds allocated.", kv_bytes)


def response_metrics(out: Exposition, counts: dict[tuple[str, int], int]) -> None:
    name = out.family("http_responses_total", "counter", "HTTP responses, by route and status.")
    for (route, status), count in sorted(counts.items()):
        out.sample(name, count, route=route, status=status)


class GPUProbe:
    """Memory, utilisation and power of the GPUs this process uses, through NVML.

    Only once CUDA is initialised in this process (the engine runs on a GPU): a CPU
    server on a GPU machine neither reports GPUs it does not use nor starts CUDA to look.
    """

    def __init__(self) -> None:
        self.nvml: Any = None
        self.failed = False

    def handles(self) -> list[tuple[int, Any]]:
        import torch

        if self.failed or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        if self.nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
            except Exception:  # no NVML library or driver: report no GPU metrics
                self.failed = True
                return []
        found = []
        for index in range(torch.cuda.device_count()):
            try:  # NVML ignores CUDA_VISIBLE_DEVICES: match torch's devices by UUID
                uuid = str(torch.cuda.get_device_properties(index).uuid)
                uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                found.append((index, self.nvml.nvmlDeviceGetHandleByUUID(uuid.encode())))
            except Exception:
                found.append((index, self.nvml.nvmlDeviceGetHandleByIndex(index)))
        return found

    def render(self, out: Exposition) -> None:
        import torch

        try:
            handles = self.handles()
        except Exception:
            return
        if not handles:
            return
        readings: dict[str, list[tuple[int, float]]] = {}

        def read(metric: str, reader) -> None:
            for index, handle in handles:
                try:
                    readings.setdefault(metric, []).append((index, reader(handle)))
                except Exception:  # some boards do not report power or utilisation
                    pass

        nvml = self.nvml
        read("memory_used", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used)
        read("memory_total", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total)
        read("utilization", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100)
        read("power", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000)
        readings["torch_allocated"] = [(i, torch.cuda.memory_allocated(i)) for i, _ in handles]
        readings["torch_reserved"] = [(i, torch.cuda.memory_reserved(i)) for i, _ in handles]
        families = {
            "memory_used": ("gpu_memory_used_bytes", "GPU memory in use (all processes), from NVML."),
            "memory_total": ("gpu_memory_total_bytes", "GPU memory in all, from NVML."),
            "utilization": ("gpu_utilization_ratio", "Fraction of the last sample period the GPU was busy."),
            "power": ("gpu_power_watts", "GPU power draw."),
            "torch_allocated": ("gpu_torch_allocated_bytes", "GPU memory this process's tensors hold."),
            "torch_reserved": ("gpu_torch_reserved_bytes", "GPU memory this process's allocator holds."),
        }
        for key, (name, help_text) in families.items():
            if readings.get(key):
                full = out.family(name, "gauge", help_text)
                for index, value in readings[key]:
                    out.sample(full, value, gpu=index)


def render_metrics(stats: EngineStats, responses: ResponseCounter, gpus: GPUProbe) -> str:
    out = Exposition()
    engine_metrics(out, stats)
    response_metrics(out, responses.snapshot())
    gpus.render(out)
    return out.text()
