"""Load on an OpenAI-compatible server, in the shape of `vllm bench serve` (random dataset).

Each request streams (`stream: true` with usage in the last chunk) and is timed from the
moment it is sent: TTFT to its first non-empty content chunk, every gap between content
chunks after that (ITL), and its end-to-end latency. TPOT is per request,
(latency - TTFT) / (output tokens - 1). Output tokens come from the final usage chunk, or
are the content chunks counted where a server sends no usage.

Prompts are random, as vLLM's random dataset: lengths uniform in [len (1 - r), len (1 + r)];
for /v1/completions a list of token ids uniform in [0, vocab) (vocab from --vocab-size or
the server's /v1/models entry), for chat random words (so chat's input length is in words).
Load is either a fixed number of requests in flight (--concurrency) or Poisson arrivals
(--request-rate, inf sends all at once) with an optional cap (--max-concurrency).

    python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000/v1 --vocab-size 32000 \\
        --num-prompts 200 --input-len 512 --output-len 128 --concurrency 16 \\
        --note "device=H200" --note "dtype=float16" --out-dir benchmarks/results

`run_benchmark(BenchConfig(...))` is the same run for other scripts; it returns the result dict.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work number night point home water "
    "room mother area money story fact month lot right study book eye job word business issue side kind "
    "head house service friend father power hour game line end member law car city community name"
).split()
PERCENTILES = (50, 90, 99)


@dataclass
class BenchConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # None: the first id of GET /models
    endpoint: str = "completions"  # completions | chat
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    concurrency: int | None = None  # fixed requests in flight; overrides request_rate
    request_rate: float = math.inf  # Poisson arrivals per second; inf: all at once
    max_concurrency: int | None = None  # cap on requests in flight under request_rate
    seed: int = 0
    ignore_eos: bool = True
    temperature: float = 0.0
    warmup: int = 0  # requests sent (and discarded) before the timed ones
    vocab_size: int | None = None  # None: from the server's model entry
    label: str | None = None
    notes: list[str] = field(default_factory=list)  # the caller's conditions: device, dtype, ...
    out_dir: str | None = None
    api_key: str | None = None  # sent as a bearer token, never recorded
    timeout_s: float = 6 * 3600  # per request, as vLLM's benchmark


@dataclass
class Prompt:
    prompt: list[int] | str
    input_len: int  # tokens for token ids; words for chat
    output_len: int


@dataclass
class Outcome:
    """One request as the client saw it (times in seconds from its send)."""

    input_len: int
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from usage
    error: str | None = None  # "HTTP 429", "stream error: ...", or an exception type
    error_detail: str | None = None


# ---- prompts --------------------------------------------------------------------------------


def sampled_lengths(rng: random.Random, length: int, ratio: float, count: int) -> list[int]:
    """Uniform integers in [length (1 - ratio), length (1 + ratio)], at least 1 (vLLM's random dataset)."""
    low, high = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def random_prompts(config: BenchConfig, vocab_size: int | None, count: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    inputs = sampled_lengths(rng, config.input_len, config.range_ratio, count)
    outputs = sampled_lengths(rng, config.output_len, config.range_ratio, count)
    prompts = []
    for n, out in zip(inputs, outputs):
        if config.endpoint == "chat":
            prompts.append(Prompt(" ".join(rng.choice(WORDS) for _ in range(n)), n, out))
        else:
            prompts.append(Prompt([rng.randrange(vocab_size) for _ in range(n)], n, out))
    return prompts


def request_body(config: BenchConfig, model: str, prompt: Prompt) -> dict:
    body: dict = {
        "model": model,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension: left out when off, for servers that refuse it
    if config.endpoint == "chat":
        body |= {"messages": [{"role": "user", "content": prompt.prompt}], "max_completion_tokens": prompt.output_len}
    else:
        body |= {"prompt": prompt.prompt, "max_tokens": prompt.output_len}
    return body


# ---- one request ------------------------------------------------------------------------------


def chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def send(session: aiohttp.ClientSession, url: str, body: dict, input_len: int) -> Outcome:
    """Stream one request and time it; never raises (a failure is the outcome's error)."""
    outcome = Outcome(input_len)
    started = time.perf_counter()
    last = started
    chunks = 0
    usage = None
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                outcome.error = f"HTTP {response.status}"
                outcome.error_detail = (await response.text())[:300]
                return outcome
            async for raw in response.content:  # one line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                    outcome.error = f"stream error: {error.get('code') or error.get('type') or 'error'}"
                    outcome.error_detail = str(error.get("message"))[:300]
                    return outcome
                usage = chunk.get("usage") or usage
                if chunk_text(chunk):
                    now = time.perf_counter()
                    if outcome.ttft is None:
                        outcome.ttft = now - started
                    else:
                        outcome.itl.append(now - last)
                    last = now
                    chunks += 1
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as error:  # ValueError: bad JSON
        outcome.error, outcome.error_detail = type(error).__name__, str(error)[:300]
        return outcome
    outcome.latency = time.perf_counter() - started
    outcome.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    outcome.prompt_tokens = int(usage["prompt_tokens"]) if usage and "prompt_tokens" in usage else None
    if outcome.ttft is None:
        outcome.error = "no content"  # a 200 whose stream held no text
    return outcome


# ---- the load -----------------------------------------------------------------------------------


async def arrivals(count: int, rate: float, rng: random.Random):
    """Yield 0..count-1, spaced by exponential gaps of mean 1/rate (a Poisson process)."""
    for i in range(count):
        yield i
        if rate != math.inf and i < count - 1:
            await asyncio.sleep(rng.expovariate(rate))


async def run_load(
    session: aiohttp.ClientSession,
    url: str,
    config: BenchConfig,
    model: str,
    prompts: list[Prompt],
    limit: int | None,
    rate: float,
) -> tuple[list[Outcome], float]:
    """Send every prompt under the load model; the outcomes in prompt order and the wall time."""
    gate = asyncio.Semaphore(limit) if limit else None

    async def one(prompt: Prompt) -> Outcome:
        if gate is None:
            return await send(session, url, request_body(config, model, prompt), prompt.input_len)
        async with gate:
            return await send(session, url, request_body(config, model, prompt), prompt.input_len)

    started = time.perf_counter()
    tasks = []
    async for i in arrivals(len(prompts), rate, random.Random(config.seed + 1)):
        tasks.append(asyncio.create_task(one(prompts[i])))
    outcomes = await asyncio.gather(*tasks)
    return list(outcomes), time.perf_counter() - started


async def server_model(session: aiohttp.ClientSession, base_url: str) -> dict:
    """The first entry of GET /models (its id; vocab_size and max_model_len where reported)."""
    async with session.get(f"{base_url}/models") as response:
        response.raise_for_status()
        data = (await response.json()).get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/models lists no model")
    return data[0]


async def run_benchmark(config: BenchConfig) -> dict:
    """Run the benchmark `config` describes; the result (conditions, metrics, per request) as a dict.
    Writes JSON and markdown into config.out_dir when it is set."""
    if config.endpoint not in ("completions", "chat"):
        raise ValueError(f"endpoint must be completions or chat, got {config.endpoint!r}")
    base_url = config.base_url.rstrip("/")
    url = f"{base_url}/{'chat/completions' if config.endpoint == 'chat' else 'completions'}"
    limit = config.concurrency or config.max_concurrency
    rate = math.inf if config.concurrency else config.request_rate
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    # limit=0: aiohttp's default pool of 100 connections would cap the concurrency silently
    connector = aiohttp.TCPConnector(limit=limit or 0)
    # read_bufsize: room for long SSE lines (chunks with logprobs) before aiohttp calls a line too long
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=connector, read_bufsize=2**20
    ) as session:
        card = await server_model(session, base_url) if config.model is None or config.vocab_size is None else {}
        model = config.model or card["id"]
        vocab_size = config.vocab_size or card.get("vocab_size")
        if config.endpoint == "completions" and not vocab_size:
            raise RuntimeError(f"{base_url}/models reports no vocab_size for {model}: pass --vocab-size")
        warmup = []
        if config.warmup:
            warm_prompts = random_prompts(config, vocab_size, config.warmup, config.seed + 2)
            warmup, _ = await run_load(session, url, config, model, warm_prompts, limit, math.inf)
        prompts = random_prompts(config, vocab_size, config.num_prompts, config.seed)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        outcomes, duration = await run_load(session, url, config, model, prompts, limit, rate)
    conditions = {
        "label": config.label or default_label(config),
        "base_url": config.base_url,
        "model": model,
        "endpoint": config.endpoint,
        "num_prompts": config.num_prompts,
        "input_len": config.input_len,
        "input_unit": "words" if config.endpoint == "chat" else "tokens",
        "output_len": config.output_len,
        "range_ratio": config.range_ratio,
        "concurrency": config.concurrency,
        "request_rate": "inf" if rate == math.inf else rate,
        "max_concurrency": None if config.concurrency else limit,
        "seed": config.seed,
        "ignore_eos": config.ignore_eos,
        "temperature": config.temperature,
        "warmup": config.warmup,
        "warmup_failed": sum(o.error is not None for o in warmup),
        "vocab_size": vocab_size,
        "vocab_size_from": "--vocab-size" if config.vocab_size else "server",
        "server_max_model_len": card.get("max_model_len"),
        "notes": list(config.notes),
        "date": date,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "client_host": platform.node(),
    }
    result = {
        "conditions": conditions,
        "metrics": metrics(outcomes, duration),
        "requests": [request_row(o) for o in outcomes],
    }
    if config.out_dir:
        result["files"] = write_outputs(result, Path(config.out_dir))
    return result


# ---- the figures ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(values: list[float]) -> dict:
    """mean and percentiles in milliseconds; None where nothing was measured."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    return {"mean": 1e3 * sum(values) / len(values), **{f"p{q}": 1e3 * percentile(values, q) for q in PERCENTILES}}


def metrics(outcomes: list[Outcome], duration: float) -> dict:
    done = [o for o in outcomes if o.error is None]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
            examples.setdefault(o.error, o.error_detail or "")
    output_tokens = sum(o.output_tokens for o in done)
    # prompt tokens as the server counted them; the planned length where it did not say
    input_tokens = sum(o.prompt_tokens if o.prompt_tokens is not None else o.input_len for o in done)
    tpot = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    return {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": summary_ms([o.ttft for o in done]),
        "tpot_ms": summary_ms(tpot),
        "itl_ms": summary_ms([gap for o in done for gap in o.itl]),
        "e2el_ms": summary_ms([o.latency for o in done]),
        "errors": errors,
        "error_examples": examples,
    }


def request_row(o: Outcome) -> dict:
    row = asdict(o)
    row["itl_count"] = len(row.pop("itl"))  # the gaps themselves are in the pooled ITL figures
    return row


def default_label(config: BenchConfig) -> str:
    load = f"c{config.concurrency}" if config.concurrency else f"rate{config.request_rate:g}"
    if not config.concurrency and config.max_concurrency:
        load += f"_max{config.max_concurrency}"
    return f"{config.endpoint}_in{config.input_len}_out{config.output_len}_{load}"


def render_markdown(result: dict) -> str:
    c, m = result["conditions"], result["metrics"]

    def row(name: str, key: str) -> str:
        s = m[key]
        cells = " / ".join("n/a" if s[k] is None else f"{s[k]:.2f}" for k in ("mean", "p50", "p90", "p99"))
        return f"| {name} mean / p50 / p90 / p99 (ms) | {cells} |"

    if c["concurrency"]:
        load = f"{c['concurrency']} in flight"
    else:
        cap = f", at most {c['max_concurrency']} in flight" if c["max_concurrency"] else ""
        load = f"Poisson rate {c['request_rate']}/s{cap}"
    spread = f" ± {c['range_ratio']:.0%}" if c["range_ratio"] else ""
    errors = ", ".join(f"{k}: {v}" for k, v in m["errors"].items()) or "none"
    lines = [
        f"### serve_bench: {c['label']}",
        "",
        f"{c['date']}; model `{c['model']}` at {c['base_url']} (/{c['endpoint']}); {c['num_prompts']} prompts, "
        f"input {c['input_len']}{spread} {c['input_unit']}, output {c['output_len']}{spread} tokens"
        f"{' (ignore_eos)' if c['ignore_eos'] else ''}; {load}; temperature {c['temperature']}; seed {c['seed']}; "
        f"warmup {c['warmup']}; python {c['python']}, aiohttp {c['aiohttp']}"
        + (f"; {'; '.join(c['notes'])}" if c["notes"] else ""),
        "",
        "| metric | value |",
        "|---|---|",
        f"| duration (s) | {m['duration_s']:.2f} |",
        f"| completed / failed | {m['completed']} / {m['failed']} |",
        f"| requests/s | {m['request_throughput']:.2f} |",
        f"| output tok/s | {m['output_throughput']:.1f} |",
        f"| total (input + output) tok/s | {m['total_token_throughput']:.1f} |",
        row("TTFT", "ttft_ms"),
        row("TPOT", "tpot_ms"),
        row("ITL", "itl_ms"),
        f"| errors | {errors} |",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "serve_bench_" + re.sub(r"[^A-Za-z0-9._-]+", "_", result["conditions"]["label"])
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(render_markdown(result))
    return {"json": str(json_path), "markdown": str(md_path)}


# ---- the command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Load on an OpenAI-compatible server (vllm bench serve's shape).")
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="default: the first id of GET /v1/models")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (words for chat)")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    parser.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len (1 - r), len (1 + r)] (default 0: fixed)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="keep this many requests in flight")
    load.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default inf)")
    parser.add_argument("--max-concurrency", type=int, help="with --request-rate: at most this many in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos: true, so every request generates its output length (default on)",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=0, help="requests sent and discarded before the timed run")
    parser.add_argument("--vocab-size", type=int, help="token ids are drawn from [0, this) (default: the server's)")
    parser.add_argument("--label", help="names the output files (default from endpoint, lengths and load)")
    parser.add_argument(
        "--note", action="append", default=[], help="a condition to record, e.g. device=H200 (repeatable)"
    )
    parser.add_argument("--out-dir", help="write serve_bench_LABEL.json and .md here")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per request")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency is not None and args.max_concurrency is not None:
        build_parser().error("--max-concurrency goes with --request-rate; --concurrency already fixes the load")
    config = BenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        warmup=args.warmup,
        vocab_size=args.vocab_size,
        label=args.label,
        notes=args.note,
        out_dir=args.out_dir,
        api_key=args.api_key,
        timeout_s=args.timeout,
    )
    try:
        result = asyncio.run(run_benchmark(config))
    except (aiohttp.ClientError, OSError, RuntimeError) as error:  # no server, no model, no vocab size
        print(f"serve_bench: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(render_markdown(result))
    for path in result.get("files", {}).values():
        print(f"wrote {path}", file=sys.stderr)
    return 0 if result["metrics"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
