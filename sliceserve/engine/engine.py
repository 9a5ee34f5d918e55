"""The generation engine: continuous batching over a slot KV cache, in a background thread.

Each step of the loop:
  1. drop cancelled requests; plan the step (engine/scheduler.py): a decode row for every
     running request, and prompt chunks of part-prefilled and newly admitted requests up to a
     token budget;
  2. prefill every planned chunk in one call (the fast path runs them in one forward), then run
     one decode step for the decoding rows (a CUDA graph on the fast path);
  3. sample the next token of every row that needs one in one batched call, with one transfer
     to the host (engine/sampler.py);
  4. turn each request's new token into text incrementally (engine/text_stream.py) and hand
     every asyncio loop its events for the step in one call.
A decode batch is padded to the model's bucket (`padded_decode_rows`, max_batch on the
reference path, where rows then attend over whole cache rows): a request's greedy output does
not depend on what else is in the batch.
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
from typing import Any

import torch

from sliceserve.engine.kv_blocks import BlockPool
from sliceserve.engine.prompt_scoring import StepScores, score_chunk
from sliceserve.engine.requests import GenerationEvent, Request, SamplingParams, TokenLogprob
from sliceserve.engine.sampler import SamplingRows, check_params, sample, warm_up
from sliceserve.engine.scheduler import StepPlan, plan_step
from sliceserve.engine.served_model import ServedModel
from sliceserve.engine.stats import EngineStats
from sliceserve.engine.text_stream import TextStream
from sliceserve.engine.token_pieces import TokenPieces
from sliceserve.model.kv_cache import PrefillChunk
from sliceserve.uploads import upload

log = logging.getLogger(__name__)

# Tokens a step carries by default. On an H200 (7B shapes, 64 streams of 256 + 256 tokens, runs 10 and 11
# of benchmarks/results/serve_gpu_h200.md) 4096 against 2048: TTFT p99 500 / 487 ms against 594 / 516,
# ITL p99 45 / 20 ms against 56 / 49 (dense / sliced), served / model about the same: a burst's prompts
# prefill in half as many steps of larger, more efficient products.
DEFAULT_TOKEN_BUDGET = 4096


class RequestRejected(Exception):
    """The engine cannot take this request (the message says why)."""


class ShuttingDown(RequestRejected):
    """The engine takes no new requests: it is stopping."""


class QueueFull(Exception):
    """Too many requests are already waiting."""


def eos_ids(model: ServedModel, tokenizer: Any) -> set[int]:
    ids = model.spec.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(tokenizer.eos_token_id)
    return found


class Engine:
    def __init__(
        self,
        model: ServedModel,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        max_model_len: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        token_budget: int | None = None,
        decoding_budget: int | None = None,
        kv_blocks: int | None = None,
        prefix_caching: bool = True,
    ):
        """token_budget: tokens one step may carry (decode rows plus prompt chunks); by default
        max(DEFAULT_TOKEN_BUDGET, prefill_chunk + max_batch).
        decoding_budget: tokens a step may carry while any request decodes (engine/scheduler.py);
        by default token_budget.
        kv_blocks: a paged KV cache of this many blocks (model/kv_cache.py: BLOCK_SIZE positions
        each), shared by the running requests as they grow; None reserves max_model_len
        positions for each of the max_batch slots.
        prefix_caching: a paged cache's full prompt blocks are kept for later requests that begin
        with the same tokens (engine/kv_blocks.py)."""
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError("max_batch, max_queue and prefill_chunk must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.pieces = TokenPieces(tokenizer)  # tokens' texts, bytes and names, memoised
        spec = model.spec
        self.max_model_len = min(max_model_len or spec.max_positions, spec.max_positions)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.token_budget = token_budget or max(DEFAULT_TOKEN_BUDGET, prefill_chunk + max_batch)
        if self.token_budget <= max_batch:
            raise ValueError("token_budget must exceed max_batch, or prompts could never be prefilled")
        self.decoding_budget = min(decoding_budget or self.token_budget, self.token_budget)
        if self.decoding_budget <= max_batch:
            raise ValueError("decoding_budget must exceed max_batch, or prompts could wait for every stream to end")
        self.device = model.input_device
        self.cache = model.new_cache(slots=max_batch, max_len=self.max_model_len, blocks=kv_blocks)
        self.blocks = BlockPool(self.cache, prefix_caching)
        # a request is admitted only if this many blocks stay free for the running ones to grow into
        self.admission_reserve = max(1, self.blocks.total // 100) if self.blocks.paged else 0
        self.free_slots = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.eos = eos_ids(model, tokenizer)
        self.outbox: list[tuple[Request, GenerationEvent]] = []  # this step's events, sent at its end
        self.wakeup = threading.Condition()
        self.stopped = False
        self.accepting = True  # until shutdown begins
        self.thread: threading.Thread | None = None
        self.stats = EngineStats(
            kv_slots_total=max_batch, kv_cache_bytes=self.cache.bytes, kv_blocks_total=self.blocks.total
        )
        model.prepare(self.cache)  # capture the decode graphs now, not during the first requests
        warm_up(self.device, spec.vocab_size)  # and compile the sampler's kernels

    # ---- submitting -------------------------------------------------------------------

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestRejected("the prompt is empty")
        if params.max_tokens < 0:  # 0: prefill only (prompt scoring), then finish
            raise RequestRejected("max_tokens must not be negative")
        if params.prompt_logprobs is not None and params.prompt_logprobs < 0:
            raise RequestRejected("prompt_logprobs must not be negative")
        if self.blocks.paged and self.blocks.blocks_for(len(prompt_ids) + params.max_tokens) > self.blocks.total:
            raise RequestRejected(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) needs more KV cache "
                f"than the server holds ({self.blocks.total * self.blocks.block_size} tokens)"
            )
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's maximum length of {self.max_model_len} tokens"
            )
        vocab = self.model.spec.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})")
        try:
            check_params(params, vocab)
        except ValueError as error:
            raise RequestRejected(str(error)) from None

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[GenerationEvent], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Request:
        """Queue a request; events arrive through `on_event`, called from the engine thread (or
        inside `loop` when given)."""
        self.check(prompt_ids, params)
        request = Request(list(prompt_ids), params, on_event, loop=loop)
        with self.wakeup:
            if self.stopped or not self.accepting:
                raise ShuttingDown("the engine is shutting down")
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
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        request = self.submit(prompt_ids, params, events.put_nowait, loop=asyncio.get_running_loop())
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

    def shutdown(self, drain: float = 0.0) -> None:
        """Take no new request; give those running or waiting up to `drain` seconds to finish
        (`cancel_all` cuts that short); then stop the loop: what is left ends as "cancelled"."""
        with self.wakeup:
            self.accepting = False
        deadline = time.monotonic() + drain
        while self.thread is not None and time.monotonic() < deadline:
            with self.wakeup:
                if not self.running and not self.waiting:
                    break
            time.sleep(0.01)
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
            self.flush()

    def cancel_all(self) -> None:
        """Cancel every request running or waiting (safe from any thread)."""
        with self.wakeup:
            for request in [*self.running, *self.waiting]:
                request.cancel()
            self.wakeup.notify()

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
            self.flush()

    def step(self) -> None:
        plan = self.plan()
        if plan.empty:
            return
        self.blocks.flush()
        logits, rows = [], []  # requests whose next token is sampled now, and their logits
        if plan.prefill and plan.decode and self.model.folds_decode_rows(len(plan.decode)):
            plan.folded, plan.decode = plan.decode, []
        if plan.prefill:
            prefill_logits, rows = self.prefill(plan)
            if rows:
                logits.append(prefill_logits)
        if plan.decode:
            logits.append(self.decode(plan.decode))
            rows += plan.decode
        if rows:
            self.accept(rows, torch.cat(logits) if len(logits) > 1 else logits[0])
        self.update_gauges()

    def prefill(self, plan: StepPlan) -> tuple[torch.Tensor, list[Request]]:
        """Prefill the plan's chunks (and its folded decode rows, as one-token chunks after them);
        score the prompts that ask; finish those that generate nothing. Returns the logits of
        the requests whose prefill is now whole and of the folded rows, and those requests."""
        chunks = [
            PrefillChunk(r.prefill_ids[start:end], start, r.slot, all_positions=scores_prompt(r))
            for r, start, end in plan.prefill
        ]
        folded = [PrefillChunk([r.output_ids[-1]], r.length - 1, r.slot) for r in plan.folded]
        logits = self.model.prefill(chunks + folded, self.cache)
        expected = sum(c.logit_rows for c in chunks) + len(folded)
        if logits.shape[0] != expected:
            raise RuntimeError(f"the model's prefill gave {logits.shape[0]} rows of logits, not {expected}")
        if folded:
            logits, folded_logits = logits[: -len(folded)], logits[-len(folded) :]
        scores, last_rows, ready, silent, row = StepScores(), [], [], [], 0
        for chunk, (request, start, end) in zip(chunks, plan.prefill):
            if chunk.all_positions:
                top = request.params.prompt_logprobs
                scores.add(score_chunk(request, logits[row : row + chunk.logit_rows], request.prompt_ids, start, top))
            row += chunk.logit_rows
            request.prefilled = end
            self.blocks.remember(request.slot, request.prefill_ids, end)
            if end == len(request.prefill_ids):
                (ready if request.params.max_tokens > 0 else silent).append(request)
                if request.params.max_tokens > 0:
                    last_rows.append(row - 1)
        for request, tokens in scores.to_host():
            request.prompt_logprobs += [self.prompt_token_logprob(*token) for token in tokens]
        for request in silent:
            self.record_prompt(request)
            self.finish(request, "length")
        if len(last_rows) < logits.shape[0]:
            logits = logits.index_select(0, upload(last_rows, logits.device))
        if folded:
            return torch.cat([logits, folded_logits]), ready + plan.folded
        return logits, ready

    def accept(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample every row's next token, hand out what it makes, and keep decoding ahead.

        While no request waits and every running request decodes, the next decode step is
        queued on the GPU (its tokens taken from the sampled ones on the device) before this
        step's tokens are read back and turned into text: the host's work per token runs while
        the GPU computes the next step. A row that ends meanwhile wastes its row in that step.
        """
        while True:
            sampled = sample(logits, self.sampling_rows(rows, logits.device))
            copy = sampled.copy_to_host()
            ahead = self.decode_ahead(rows)
            next_logits = None if ahead is None else self.decode(ahead, sampled.tokens)
            tokens, logprobs = copy.result()
            self.take_tokens(rows, tokens, logprobs)
            self.flush()  # stream the tokens now, not at the end of the burst
            if ahead is None:
                return
            keep = [i for i, r in enumerate(ahead) if r in self.running and not r.cancelled]
            if not keep:
                return
            rows = [ahead[i] for i in keep]
            logits = (
                next_logits
                if len(keep) == len(ahead)
                else next_logits.index_select(0, upload(keep, next_logits.device))
            )

    def decode_ahead(self, rows: list[Request]) -> list[Request] | None:
        """The rows of the next decode step if it can be queued before this step's tokens are
        read: nothing waits, every running request is among `rows` and none ends by length now."""
        if self.stopped or self.waiting or len(rows) != len(self.running):
            return None
        for r in rows:
            last = len(r.output_ids) + 1 >= r.params.max_tokens or r.length + 1 >= self.max_model_len
            if last or r.cancelled:
                return None
        if sum(self.blocks.missing(r.slot, r.length + 1) for r in rows) > self.blocks.available:
            return None  # the next step needs a preemption: the scheduler decides it
        for r in rows:
            self.blocks.grow(r.slot, r.length + 1)
        self.blocks.flush()
        return rows

    def plan(self) -> StepPlan:
        with self.wakeup:
            for request in [r for r in self.running if r.cancelled]:
                self.finish(request, "cancelled")
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self.finish(request, "cancelled")
            self.grow_decoders()
            plan = plan_step(
                self.running,
                self.waiting,
                len(self.free_slots),
                token_budget=self.token_budget,
                prefill_chunk=self.prefill_chunk,
                decoding_budget=self.decoding_budget,
                admit=self.admit,
            )
            self.hold_prefill_blocks(plan)
            self.update_gauges()
        return plan

    def grow_decoders(self) -> None:
        """Blocks for every decoding request's next position; where too few are free, preempt
        the most recently admitted requests (to recompute later) until the others fit."""
        for request in list(self.running):
            if request not in self.running or not request.decoding:
                continue
            while not self.blocks.grow(request.slot, request.length):
                self.preempt(next(r for r in reversed(self.running) if r is not request))

    def hold_prefill_blocks(self, plan: StepPlan) -> None:
        """Blocks for the whole prefill of every request admitted now, so that a prompt begun is
        never stalled for want of blocks (the others' prefills hold theirs already). A request
        is admitted only while a reserve stays free for the running ones to grow into; the first
        that does not fit goes back to the front of the queue with every one admitted after it."""
        for n, request in enumerate(plan.admitted):
            tokens = len(request.prefill_ids)
            others = len(self.running) - len(plan.admitted) + n  # running before these admissions
            reserve = self.admission_reserve if others else 0
            if self.blocks.missing(request.slot, tokens) + reserve <= self.blocks.available:
                self.blocks.grow(request.slot, tokens)
                continue
            refused = plan.admitted[n:]
            for late in reversed(refused):
                self.unadmit(late)
            plan.prefill = [chunk for chunk in plan.prefill if chunk[0] not in refused]
            plan.admitted = plan.admitted[:n]
            return

    def unadmit(self, request: Request) -> None:
        """Back to the front of the queue (its sampling state kept)."""
        self.running.remove(request)
        self.release_slot(request)
        with self.stats.lock:
            self.stats.prefix_cache_hit_tokens -= request.prefilled  # counted again when admitted
        request.prefilled = 0
        self.waiting.appendleft(request)

    def preempt(self, request: Request) -> None:
        """Free a running request's slot and blocks; it waits at the front of the queue to
        prefill its prompt and output so far again, then goes on where it stopped."""
        log.info("preempting request %d (%d tokens) for want of KV cache blocks", request.id, request.length)
        self.running.remove(request)
        self.release_slot(request)
        request.recomputed, request.prefilled = len(request.output_ids), 0
        if request.recomputed == 0 and request.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # its prompt is scored again from the start
        self.waiting.appendleft(request)
        with self.stats.lock:
            self.stats.preemptions += 1

    def release_slot(self, request: Request) -> None:
        self.blocks.release(request.slot)
        self.free_slots.append(request.slot)
        self.free_slots.sort()
        request.slot = None

    def admit(self, request: Request) -> None:
        """A slot, and the cached blocks its prompt begins with (not for prompt scoring, which
        needs every position's logits)."""
        request.slot = self.free_slots.pop(0)
        if not scores_prompt(request):
            request.prefilled = self.blocks.share_prefix(request.slot, request.prefill_ids)
            with self.stats.lock:
                self.stats.prefix_cache_hit_tokens += request.prefilled
        if request.text is not None:  # readmitted after a preemption: its output so far stays
            self.running.append(request)
            return
        request.seed = request.params.seed if request.params.seed is not None else random.getrandbits(63)
        params = request.params
        request.text = TextStream(
            self.tokenizer,
            params.stop,
            skip_special_tokens=params.skip_special_tokens,
            include_stop=params.include_stop_str_in_output,
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # the first token has nothing before it
        self.running.append(request)

    def decode(self, requests: list[Request], sampled: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of one decode step of `requests`: each feeds its last token, or, given `sampled`
        (the device tensor of tokens just sampled for them, not yet in output_ids), that one."""
        pad = self.model.padded_decode_rows(len(requests), self.max_batch) - len(requests)
        ahead = sampled is not None
        positions = [r.length - (not ahead) for r in requests] + [0] * pad
        slots = [r.slot for r in requests] + [self.cache.scratch_slot] * pad
        as_tensor = lambda values: upload(values, self.device)  # noqa: E731
        if ahead:
            sampled = sampled.to(self.device)  # a pipeline's logits come out on its last device
            tokens = torch.cat([sampled, sampled.new_zeros(pad)]) if pad else sampled
        else:
            tokens = as_tensor([r.output_ids[-1] for r in requests] + [0] * pad)
        logits = self.model.forward_cached(tokens[:, None], as_tensor(positions)[:, None], as_tensor(slots), self.cache)
        return logits[: len(requests), 0]

    # ---- output -----------------------------------------------------------------------

    def sampling_rows(self, requests: list[Request], device: torch.device) -> SamplingRows:
        return SamplingRows.build(
            [r.params for r in requests],
            [len(r.output_ids) for r in requests],
            [r.seed for r in requests],
            device,
            self.model.spec.vocab_size,
            output_ids=[r.output_ids for r in requests],
            prompt_ids=[r.prompt_ids for r in requests],
            eos_ids=self.eos,
        )

    def take_tokens(self, requests: list[Request], tokens: list[int], logprobs: list) -> None:
        now = time.perf_counter()
        for request, token, chosen in zip(requests, tokens, logprobs):
            try:
                self.take_token(request, token, chosen, now)
            except Exception as error:  # one request's failure (detokenizing, say) ends that request alone
                log.exception("request %d failed", request.id)
                self.finish(request, "error", error=f"internal error: {error}")

    def take_token(self, request: Request, token: int, chosen, now: float) -> None:
        params = request.params
        logprobs = [] if chosen is None else [self.token_logprob(token, *chosen)]
        self.record_token(request, now)
        request.output_ids.append(token)
        # eos (unless ignored) and the request's stop tokens end it; their text is sent only when
        # include_stop_str_in_output asks (and then not for special tokens, unless kept)
        eos = (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids
        final = eos or len(request.output_ids) >= params.max_tokens or request.length >= self.max_model_len
        ending_text = [token] if params.include_stop_str_in_output or not eos else []
        step = request.text.add(ending_text, final=final)
        if step.stopped:
            self.finish(request, "stop", delta=step.delta, token_ids=[token], logprobs=logprobs)
        elif final:
            self.finish(request, "stop" if eos else "length", delta=step.delta, token_ids=[token], logprobs=logprobs)
        else:
            self.send(request, GenerationEvent(step.delta, [token], logprobs))

    def token_logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        text = self.pieces.text
        return TokenLogprob(text(token), token, logprob, [(text(t), v) for t, v in top], [t for t, _ in top])

    def prompt_token_logprob(self, token: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> TokenLogprob:
        scored = self.token_logprob(token, logprob, top)
        scored.rank = rank
        return scored

    def finish(
        self,
        request: Request,
        reason: str,
        *,
        delta: str = "",
        token_ids: list[int] | None = None,
        logprobs: list | None = None,
        error: str | None = None,
    ) -> None:
        if request in self.running:
            self.running.remove(request)
            self.release_slot(request)
        self.record_finish(request, reason)
        self.send(
            request,
            GenerationEvent(
                delta,
                token_ids or [],
                logprobs or [],
                finish_reason=reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=len(request.output_ids),
                error=error,
            ),
        )

    def send(self, request: Request, event: GenerationEvent) -> None:
        if event.finish_reason is None:
            event.prompt_tokens, event.completion_tokens = len(request.prompt_ids), len(request.output_ids)
        scored = request.prompt_logprobs
        if scored is not None and not request.prompt_logprobs_sent and len(scored) == len(request.prompt_ids):
            event.prompt_logprobs, request.prompt_logprobs_sent = scored, True
        self.outbox.append((request, event))

    def flush(self) -> None:
        """Hand out the step's events: directly to synchronous consumers, and to each asyncio
        loop in one call (one wake-up of the loop per step, not one per token)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, GenerationEvent]]] = {}
        for request, event in self.outbox:
            if request.loop is None:
                request.on_event(event)
            else:
                by_loop.setdefault(request.loop, []).append((request, event))
        self.outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, events)
            except RuntimeError:  # the consumers' event loop is gone (clients left): nothing to tell
                for request, _ in events:
                    request.cancel()

    # ---- statistics -------------------------------------------------------------------

    def record_prompt(self, request: Request) -> None:
        """The prompt tokens of a request that generates nothing (counted at the first token otherwise)."""
        with self.stats.lock:
            self.stats.prompt_tokens += len(request.prompt_ids)

    def record_token(self, request: Request, now: float) -> None:
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
            self.stats.kv_blocks_used = self.blocks.used


def scores_prompt(request: Request) -> bool:
    """Its prefill returns every position's logits: it asked for prompt logprobs, and this is not
    the recompute after a preemption of a prompt already scored."""
    return request.params.prompt_logprobs is not None and request.recomputed == 0


def deliver(events: list[tuple[Request, GenerationEvent]]) -> None:
    """Inside a consumer's event loop: each request's events, in order."""
    for request, event in events:
        request.on_event(event)
