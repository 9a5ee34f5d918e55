"""The serving benchmark's CPU smoke run on the demo model: SmolLM2-135M exported dense, served
by the engine behind a real uvicorn server on 127.0.0.1, loaded over HTTP by
benchmarks/serve_bench.py. Only the run's health and the shape of its report are checked
(no errors, every token counted, ordered percentiles), never a speed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from server_support import demo_checkpoint_path, start_server

from sliceserve.engine.loading import load_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from serve_bench import BenchConfig, run_benchmark  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    engine = load_engine(demo_checkpoint_path(tmp_path_factory), max_batch=4, max_model_len=128)
    with start_server(engine, model_name="smollm2-dense") as running:
        yield running


def test_a_concurrent_streaming_run_on_the_demo_model(demo_server, tmp_path):
    config = BenchConfig(
        base_url=demo_server.base_url,
        num_prompts=6,
        input_len=16,
        output_len=8,
        concurrency=3,
        vocab_size=demo_server.engine.model.spec.vocab_size,
        seed=3,
        warmup=1,
        out_dir=str(tmp_path),
        notes=["device=cpu", "model=SmolLM2-135M dense export"],
    )
    result = asyncio.run(run_benchmark(config))
    metrics = result["metrics"]
    assert metrics["completed"] == 6 and metrics["failed"] == 0 and metrics["errors"] == {}
    assert metrics["total_output_tokens"] == 6 * 8
    assert metrics["output_throughput"] > 0 and metrics["request_throughput"] > 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        summary = metrics[name]
        assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"], (name, summary)
    assert metrics["ttft_ms"]["p50"] <= metrics["e2el_ms"]["p50"]
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".md"]
