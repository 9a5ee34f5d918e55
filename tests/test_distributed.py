"""Pipeline stages in two processes, launched by torchrun over gloo, against the single-device
run of the same checkpoint (the server tests' tiny sliced Llama, two layers: one per rank).

What is compared:
- logits without a cache and cached prefill logits: bit for bit;
- decode steps of four rows, which rank 0 cuts into two micro-batches of two rows: bit for bit
  with the single-device model run on the same two-row pieces, and to float32 rounding with
  the four rows at once (a matmul's kernel, hence its rounding, depends on its row count);
- greedy texts from an engine over the pipeline, and from `sliceserve serve --distributed`
  answering a real HTTP request on rank 0;
- shutdown: when rank 0 stops (SIGTERM to it alone), every rank ends and torchrun exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from server_support import checkpoint_path
from torchrun_support import environment, free_port, torchrun_command

from sliceserve.engine.engine import Engine
from sliceserve.engine.requests import SamplingParams
from sliceserve.model.loader import load_model, load_tokenizer

HERE = Path(__file__).parent
PROMPTS = ["ka lo mi ra", "ten sul or", "ve an dis po que", "stra ni el bu"]  # as distributed_stages.py
MAX_LEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return checkpoint_path(tmp_path_factory)


def single_device_texts(checkpoint: Path, prompts: list[list[int]], max_batch: int) -> list[str]:
    tokenizer = load_tokenizer(checkpoint)
    engine = Engine(load_model(checkpoint), tokenizer, max_batch=max_batch, max_model_len=MAX_LEN, prefill_chunk=5)
    engine.start()
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        return ["".join(event.text for event in engine.generate(ids, params)) for ids in prompts]
    finally:
        engine.shutdown()


def test_two_processes_match_the_single_device(checkpoint, tmp_path):
    out = tmp_path / "pipeline.pt"
    result = subprocess.run(
        torchrun_command(HERE / "distributed_stages.py", checkpoint, out),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stage 1 of 2: layers 1 on cpu (gloo)" in result.stderr and "stage 1 stopped" in result.stderr
    got = torch.load(out)
    model = load_model(checkpoint)
    prompts = got["prompts"]
    with torch.inference_mode():
        assert torch.equal(got["forward"], model(torch.tensor([prompts[0][:3] + prompts[1][:3]])))
        cache = model.new_cache(slots=4, max_len=MAX_LEN)
        for slot, ids in enumerate(prompts):
            expected = model.forward_cached(
                torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([slot]), cache, last_only=True
            )
            assert torch.equal(got["prefill"][slot], expected)
        whole_cache = model.new_cache(slots=4, max_len=MAX_LEN)
        for slot, ids in enumerate(prompts):
            model.forward_cached(torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([slot]), whole_cache)
        last = [int(logits[0, -1].argmax()) for logits in got["prefill"]]
        lengths = [len(ids) for ids in prompts]
        for step in got["decode"]:
            tokens, positions = torch.tensor(last)[:, None], torch.tensor(lengths)[:, None]
            pieces = [
                model.forward_cached(tokens[rows], positions[rows], torch.arange(4)[rows], cache)
                for rows in (slice(0, 2), slice(2, 4))
            ]
            assert torch.equal(step, torch.cat(pieces))
            whole = model.forward_cached(tokens, positions, torch.arange(4), whole_cache)
            torch.testing.assert_close(step, whole, rtol=1e-5, atol=1e-5)
            last, lengths = [int(row.argmax()) for row in step[:, 0]], [n + 1 for n in lengths]
    assert got["texts"] == single_device_texts(checkpoint, prompts, max_batch=2)
    assert all(len(text) > 5 for text in got["texts"])


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_http_server_on_rank_0(checkpoint, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    command = torchrun_command(
        "-m",
        "sliceserve",
        "serve",
        checkpoint,
        "--distributed",
        "--port",
        port,
        "--max-batch",
        2,
        "--max-model-len",
        MAX_LEN,
    )
    with open(log, "w") as output:
        server = subprocess.Popen(command, env=environment(), stdout=output, stderr=subprocess.STDOUT)
    try:

        def rank_0_pid():
            assert server.poll() is None, log.read_text()
            match = re.search(r"Started server process \[(\d+)\]", log.read_text())
            return int(match.group(1)) if match else None

        pid = wait_for(rank_0_pid, 120, "the server on rank 0")
        wait_for(lambda: "serving" in log.read_text(), 30, "the server to listen")
        tokenizer = load_tokenizer(checkpoint)
        answer = post_json(
            f"http://127.0.0.1:{port}/v1/completions",
            {"prompt": PROMPTS[:2], "max_tokens": 12, "temperature": 0, "ignore_eos": True},
        )
        texts = [choice["text"] for choice in sorted(answer["choices"], key=lambda c: c["index"])]
        expected = single_device_texts(checkpoint, [tokenizer(p)["input_ids"] for p in PROMPTS[:2]], max_batch=2)
        assert texts == expected
        os.kill(pid, signal.SIGTERM)  # rank 0 alone: it must stop the other rank itself
        assert server.wait(timeout=60) == 0, log.read_text()
        assert "stage 1 stopped" in log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
