"""The generation engine: continuous batching over a slot KV cache, in a background thread.

Each step of the loop:
  1. drop cancelled requests and admit waiting ones into free slots (first come, first served);
  2. run one prefill chunk (at most `prefill_chunk` prompt tokens) of the oldest request still
     prefilling, so a long prompt never stalls the running streams for its whole prefill;
  3. run one decode step for every request that has a token to feed.
A decode batch is always padded to `max_batch` rows (padding rows write into a scratch
slot) and attends over whole cache rows: the shapes never change, so a request's numbers,
and its greedy output, do not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sliceserve.errors import SliceserveError
from sliceserve.runtime.detokenizer import text_step
from sliceserve.runtime.model import Transformer
from sliceserve.runtime.requests import GenerationEvent, Request, SamplingParams
from sliceserve.runtime.sampling import next_token, token_logprob
from sliceserve.runtime.stats import EngineStats

log = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The engine cannot take this request (the message says why)."""


class QueueFull(Exception):
    """Too many requests are already waiting."""


def eos_ids(model: Transformer, tokenizer: Any) -> set[int]:
    ids = model.spec.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(tokenizer.eos_token_id)
    return found


class Engine:
    def __init__(self, model: Transformer, tokenizer: Any, *, max_batch: int = 8, max_model_len: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256):
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError("max_batch, max_queue and prefill_chunk must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        spec = model.spec
        self.max_model_len = min(max_model_len or spec.max_positions, spec.max_positions)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.device = model.input_device
        self.cache = model.new_cache(slots=max_batch, max_len=self.max_model_len)
        self.free_slots = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.generators: dict[int, torch.Generator] = {}
        self.eos = eos_ids(model, tokenizer)
        self.wakeup = threading.Condition()
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.stats = EngineStats(kv_slots_total=max_batch, kv_cache_bytes=self.cache.bytes)

    # ---- submitting -------------------------------------------------------------------

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestRejected("the prompt is empty")
        if params.max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's maximum length of {self.max_model_len} tokens"
            )
        vocab = self.model.spec.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})")

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[GenerationEvent], None]) -> Request:
        """Queue a request; events arrive through `on_event`, called from the engine thread."""
        self.check(prompt_ids, params)
        request = Request(list(prompt_ids), params, on_event)
        with self.wakeup:
            if self.stopped:
                raise RequestRejected("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self.wakeup:
            self.wakeup.notify()

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationEvent]:
        """Events of one request; closing this generator cancels the request and frees its slot."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        request = self.submit(prompt_ids, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.cancel(request)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationEvent]:
        """Synchronous version of `stream`."""
        events: queue.Queue[GenerationEvent] = queue.Queue()
        request = self.submit(prompt_ids, params, events.put)
        finished = False
        try:
            while not finished:
                event = events.get()
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.cancel(request)

    # ---- the loop ---------------------------------------------------------------------

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.loop, name="sliceserve-engine", daemon=True)
            self.thread.start()

    def shutdown(self) -> None:
        """Stop the loop; requests still running or waiting end as "cancelled"."""
        with self.wakeup:
            self.stopped = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        with self.wakeup:
            for request in list(self.running) + list(self.waiting):
                self.finish(request, "cancelled")
            self.waiting.clear()

    def loop(self) -> None:
        while True:
            with self.wakeup:
                while not self.stopped and not self.waiting and not self.running:
                    self.wakeup.wait()
                if self.stopped:
                    return
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as error:  # a bug must not take the server down: fail the batch
                log.exception("engine step failed")
                for request in list(self.running):
                    self.finish(request, "error", error=f"internal error: {error}")

    def step(self) -> None:
        self.admit()
        prefilling = [r for r in self.running if r.prefilled < len(r.prompt_ids)]
        if prefilling:
            self.prefill(prefilling[0])
        decoding = [r for r in self.running if r.prefilled == len(r.prompt_ids) and r.output_ids]
        if decoding:
            self.decode(decoding)
        self.update_gauges()

    def admit(self) -> None:
        with self.wakeup:
            for request in [r for r in self.running if r.cancelled]:
                self.finish(request, "cancelled")
            while self.waiting and (self.waiting[0].cancelled or self.free_slots):
                request = self.waiting.popleft()
                if request.cancelled:
                    self.finish(request, "cancelled")
                    continue
                request.slot = self.free_slots.pop(0)
                seed = request.params.seed if request.params.seed is not None else random.getrandbits(63)
                self.generators[request.id] = torch.Generator().manual_seed(seed)
                self.running.append(request)
            self.update_gauges()

    def prefill(self, request: Request) -> None:
        start = request.prefilled
        chunk = request.prompt_ids[start : start + self.prefill_chunk]
        tokens = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        slots = torch.tensor([request.slot], device=self.device)
        logits = self.model.forward_cached(tokens, positions, slots, self.cache, last_only=True)
        request.prefilled += len(chunk)
        if request.prefilled == len(request.prompt_ids):
            self.accept_safely(request, logits[0, -1])

    def decode(self, requests: list[Request]) -> None:
        pad = self.model.decode_rows(len(requests), self.max_batch) - len(requests)
        tokens = [r.output_ids[-1] for r in requests] + [0] * pad
        positions = [r.length - 1 for r in requests] + [0] * pad
        slots = [r.slot for r in requests] + [self.cache.scratch_slot] * pad
        as_tensor = lambda values: torch.tensor(values, device=self.device)  # noqa: E731
        logits = self.model.forward_cached(as_tensor(tokens)[:, None], as_tensor(positions)[:, None],
                                           as_tensor(slots), self.cache)
        for row, request in enumerate(requests):
            self.accept_safely(request, logits[row, 0])

    # ---- output -----------------------------------------------------------------------

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def accept_safely(self, request: Request, logits: torch.Tensor) -> None:
        """One request's failure (in its sampling or detokenizing) ends that request alone."""
        try:
            self.accept(request, logits)
        except Exception as error:
            log.exception("request %d failed", request.id)
            self.finish(request, "error", error=f"internal error: {error}")

    def accept(self, request: Request, logits: torch.Tensor) -> None:
        """Take the next token of a request from its logits, and send what is now final."""
        params = request.params
        token = next_token(logits, params, self.generators[request.id])
        logprobs = []
        if params.logprobs is not None:
            logprobs = [token_logprob(logits, token, params.logprobs, lambda t: self.tokenizer.decode([t]))]
        self.record_token(request)
        request.output_ids.append(token)
        if token in self.eos and not params.ignore_eos:
            self.emit(request, [token], logprobs, final=True, reason="stop", eos=True)
        elif len(request.output_ids) >= params.max_tokens or request.length >= self.max_model_len:
            self.emit(request, [token], logprobs, final=True, reason="length")
        else:
            self.emit(request, [token], logprobs, final=False)

    def emit(self, request: Request, token_ids: list[int], logprobs: list, *, final: bool,
             reason: str | None = None, eos: bool = False) -> None:
        text_ids = request.output_ids[:-1] if eos else request.output_ids
        step = text_step(self.decode_text(text_ids), request.emitted_chars, request.params.stop, final)
        request.emitted_chars += len(step.delta)
        if step.stopped:
            final, reason = True, "stop"
        if not final:
            self.send(request, GenerationEvent(step.delta, token_ids, logprobs))
            return
        self.finish(request, reason, delta=step.delta, token_ids=token_ids, logprobs=logprobs)

    def finish(self, request: Request, reason: str, *, delta: str = "", token_ids: list[int] | None = None,
               logprobs: list | None = None, error: str | None = None) -> None:
        if request in self.running:
            self.running.remove(request)
            self.free_slots.append(request.slot)
            self.free_slots.sort()
            self.generators.pop(request.id, None)
        self.record_finish(request, reason)
        self.update_gauges()
        self.send(request, GenerationEvent(delta, token_ids or [], logprobs or [], finish_reason=reason,
                                           prompt_tokens=len(request.prompt_ids),
                                           completion_tokens=len(request.output_ids), error=error))

    def send(self, request: Request, event: GenerationEvent) -> None:
        if event.finish_reason is None:
            event.prompt_tokens, event.completion_tokens = len(request.prompt_ids), len(request.output_ids)
        try:
            request.on_event(event)
        except RuntimeError:  # the consumer's event loop is gone (client left): nothing to tell
            request.cancel()

    # ---- statistics -------------------------------------------------------------------

    def record_token(self, request: Request) -> None:
        now = time.perf_counter()
        with self.stats.lock:
            if request.first_token_time is None:
                request.first_token_time = now
                self.stats.time_to_first_token.observe(now - request.arrival)
                self.stats.prompt_tokens += len(request.prompt_ids)
            else:
                self.stats.inter_token_latency.observe(now - request.last_token_time)
            self.stats.generation_tokens += 1
        request.last_token_time = now

    def record_finish(self, request: Request, reason: str) -> None:
        with self.stats.lock:
            self.stats.finished[reason] += 1
            self.stats.request_latency.observe(time.perf_counter() - request.arrival)

    def update_gauges(self) -> None:
        with self.stats.lock:
            self.stats.running = len(self.running)
            self.stats.waiting = len(self.waiting)
            self.stats.kv_slots_used = self.max_batch - len(self.free_slots)


def load_engine(path: str | Path, *, device: str = "cpu", max_batch: int = 8, max_model_len: int | None = None,
                max_queue: int = 64, prefill_chunk: int = 256, dtype: torch.dtype | None = None,
                runtime: str = "auto") -> Engine:
    """An engine over a checkpoint folder (dense or sliced), not yet started.

    runtime: "fast" (Triton kernels and CUDA graphs; CUDA only), "reference" (plain PyTorch),
    or "auto" (fast on CUDA, reference elsewhere).
    """
    from sliceserve.runtime.loader import load_model, load_tokenizer

    model = load_model(path, device=device, dtype=dtype)
    if use_fast_path(runtime, device):
        from sliceserve.runtime.fast_model import FastTransformer

        model = FastTransformer(model, semi_structured=uses_sparse_tensor_cores(path, device))
    engine = Engine(model, load_tokenizer(path), max_batch=max_batch, max_model_len=max_model_len,
                    max_queue=max_queue, prefill_chunk=prefill_chunk)
    prepare = getattr(model, "prepare", None)
    if prepare is not None:  # capture the decode graphs now, not during the first requests
        prepare(engine.cache)
    return engine


def uses_sparse_tensor_cores(path: str | Path, device: str | torch.device) -> bool:
    """A 2:4-pruned checkpoint on a GPU with sparse tensor cores (else its zeros run dense)."""
    from sliceserve.checkpoint import read_config
    from sliceserve.runtime.semi_structured import supports_semi_structured

    pattern = (read_config(path).get("sparsity") or {}).get("pattern")
    return pattern == "2:4" and supports_semi_structured(torch.device(device))


def use_fast_path(runtime: str, device: str | torch.device) -> bool:
    on_cuda = torch.device(device).type == "cuda"
    if runtime not in ("auto", "fast", "reference"):
        raise SliceserveError(f"unknown runtime {runtime!r}: auto, fast or reference")
    if runtime == "fast" and not on_cuda:
        raise SliceserveError("the fast runtime needs a CUDA device (on a CPU its Triton kernels only run "
                              "interpreted, for tests); use --runtime reference or auto")
    return runtime == "fast" or (runtime == "auto" and on_cuda)
