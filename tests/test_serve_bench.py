"""benchmarks/serve_bench.py against a real server: uvicorn on 127.0.0.1 over the engine and
the tiny sliced checkpoint of server_support, driven over real HTTP by the benchmark's
own client (aiohttp). The figures are CPU timings of a toy model: only their consistency is
checked (no failures, exact token counts under ignore_eos, ordered percentiles), not values."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from server_support import checkpoint_path, start_server

from sliceserve.engine.loading import load_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import serve_bench  # noqa: E402
from serve_bench import BenchConfig, percentile, run_benchmark  # noqa: E402

MODEL = "tiny-sliced"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = load_engine(checkpoint_path(tmp_path_factory), max_batch=8, max_model_len=256)
    with start_server(engine, model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def vocab(server) -> int:
    return server.engine.model.spec.vocab_size


def assert_ordered(summary: dict) -> None:
    assert summary["mean"] > 0 and 0 < summary["p50"] <= summary["p90"] <= summary["p99"], summary


def test_the_command_line_run_at_fixed_concurrency_counts_every_token_and_records_its_conditions(
    server, vocab, tmp_path, capsys
):
    argv = [
        "--base-url",
        server.base_url,
        "--num-prompts",
        "12",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--concurrency",
        "4",
        "--vocab-size",
        str(vocab),
        "--seed",
        "1",
        "--warmup",
        "2",
        "--label",
        "c4 run",
        "--note",
        "device=cpu",
        "--note",
        "dtype=float32",
        "--out-dir",
        str(tmp_path),
    ]
    assert serve_bench.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "serve_bench_c4_run.json").read_text())
    m, c = result["metrics"], result["conditions"]
    assert (m["completed"], m["failed"], m["errors"]) == (12, 0, {})
    assert m["total_output_tokens"] == 12 * 6 and m["total_input_tokens"] == 12 * 8
    assert m["duration_s"] > 0 and m["request_throughput"] > 0
    assert m["total_token_throughput"] == pytest.approx(m["output_throughput"] * (8 + 6) / 6)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert_ordered(m[key])
    assert all(
        r["output_tokens"] == 6 and r["prompt_tokens"] == 8 and r["ttft"] < r["latency"] for r in result["requests"]
    )
    assert c["model"] == MODEL and c["base_url"] == server.base_url and c["endpoint"] == "completions"
    assert (c["num_prompts"], c["input_len"], c["output_len"], c["concurrency"]) == (12, 8, 6, 4)
    assert c["request_rate"] == "inf" and c["ignore_eos"] is True and c["temperature"] == 0.0
    assert c["warmup"] == 2 and c["warmup_failed"] == 0 and c["vocab_size"] == vocab
    assert c["notes"] == ["device=cpu", "dtype=float32"] and c["python"] and c["aiohttp"] and c["date"]
    markdown = (tmp_path / "serve_bench_c4_run.md").read_text()
    assert markdown in printed
    for text in (
        "model `tiny-sliced`",
        "12 prompts",
        "input 8 tokens",
        "output 6 tokens (ignore_eos)",
        "4 in flight",
        "device=cpu; dtype=float32",
        "| completed / failed | 12 / 0 |",
        "| errors | none |",
    ):
        assert text in markdown, text


def test_poisson_arrivals_with_a_cap_and_varied_lengths(server, vocab):
    config = BenchConfig(
        base_url=server.base_url,
        num_prompts=10,
        input_len=8,
        output_len=6,
        range_ratio=0.5,
        request_rate=40.0,
        max_concurrency=3,
        vocab_size=vocab,
        seed=2,
    )
    result = asyncio.run(run_benchmark(config))
    m, c = result["metrics"], result["conditions"]
    assert (m["completed"], m["failed"]) == (10, 0)
    # ignore_eos: each request generated exactly its sampled length, uniform in [3, 9]
    requested = serve_bench.random_prompts(config, vocab, 10, config.seed)
    assert [r["output_tokens"] for r in result["requests"]] == [p.output_len for p in requested]
    assert all(3 <= p.output_len <= 9 and 4 <= p.input_len <= 12 for p in requested)
    assert m["total_output_tokens"] == sum(p.output_len for p in requested)
    assert_ordered(m["ttft_ms"]) and assert_ordered(m["itl_ms"])
    assert (c["request_rate"], c["max_concurrency"], c["concurrency"]) == (40.0, 3, None)
    assert "files" not in result  # no out_dir, nothing written


def test_chat_with_random_words(server):
    config = BenchConfig(
        base_url=server.base_url,
        endpoint="chat",
        model=MODEL,
        num_prompts=4,
        input_len=5,
        output_len=4,
        concurrency=2,
        vocab_size=1,
    )  # vocab unused for chat
    m = asyncio.run(run_benchmark(config))["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (4, 0, 16)
    assert m["total_input_tokens"] > 4 * 5  # the chat template's tokens, as the server counted them


def test_errors_are_counted_by_status_and_by_exception(server, vocab):
    too_long = BenchConfig(
        base_url=server.base_url, num_prompts=3, input_len=250, output_len=20, concurrency=3, vocab_size=vocab
    )  # 270 tokens > max_model_len 256: refused with 400
    m = asyncio.run(run_benchmark(too_long))["metrics"]
    assert (m["completed"], m["failed"], m["errors"]) == (0, 3, {"HTTP 400": 3})
    assert m["ttft_ms"]["p50"] is None
    closed = BenchConfig(base_url="http://127.0.0.1:9/v1", model="x", vocab_size=10, num_prompts=2, concurrency=1)
    m = asyncio.run(run_benchmark(closed))["metrics"]
    assert m["failed"] == 2 and list(m["errors"]) == ["ClientConnectorError"]


def test_the_vocabulary_comes_from_the_servers_model_card(server, vocab):
    """Without --vocab-size the prompts' token ids are drawn from the vocabulary /v1/models reports."""
    result = asyncio.run(run_benchmark(BenchConfig(base_url=server.base_url, num_prompts=2, output_len=2)))
    assert result["conditions"]["vocab_size"] == vocab and result["metrics"]["failed"] == 0


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert [percentile(values, q) for q in (0, 50, 90, 100)] == pytest.approx([1.0, 2.5, 3.7, 4.0])
