"""Counters and histograms the engine keeps, for the server's /metrics."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # cumulative per bucket, as Prometheus
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


@dataclass
class EngineStats:
    finished: Counter = field(default_factory=Counter)  # requests by finish reason
    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: Histogram = field(default_factory=Histogram)
    inter_token_latency: Histogram = field(default_factory=Histogram)
    request_latency: Histogram = field(default_factory=Histogram)
    running: int = 0
    waiting: int = 0
    kv_slots_used: int = 0
    kv_slots_total: int = 0
    kv_cache_bytes: int = 0
    kv_blocks_used: int = 0  # blocks of positions (a reserved cache: slots)
    kv_blocks_total: int = 0
    prefix_cache_hit_tokens: int = 0  # prompt tokens found in the cache, not computed
    preemptions: int = 0  # requests put back to the queue for want of cache blocks, to recompute
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
