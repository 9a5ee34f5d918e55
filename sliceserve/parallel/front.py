"""Rank 0's model: the first stage here, the others in their processes, behind the same
interface the engine uses on `Transformer`.

A decode batch of several rows is cut into micro-batches: micro-batch 1 is sent on while
this rank computes micro-batch 2, so the stages work at the same time. A prefill chunk
(one row) goes through whole. Row splits change the row count each matmul sees, so a
split step matches the single-device run to rounding, not bit for bit (see the tests).
On GPUs every stage runs the fast path's layers, eagerly (parallel/stages.py).
"""

from __future__ import annotations

import torch

from sliceserve.model.kv_cache import KVCache, PrefillChunk, prefill_each
from sliceserve.model.spec import DecoderSpec
from sliceserve.parallel.messages import (
    Header,
    InFlight,
    Kind,
    receive,
    send_all,
    step_metadata,
    wait_all,
)
from sliceserve.parallel.process_group import StageProcess, stop_stage_process
from sliceserve.parallel.stages import Activations, FastStage, ReferenceStage


class FrontCache:
    """Rank 0's part of the KV cache; each other stage holds its own part in its process."""

    def __init__(self, local: KVCache, num_layers: int):
        self.local, self.num_layers = local, num_layers
        self.keys, self.values = local.keys, local.values
        self.slots, self.max_len, self.scratch_slot = local.slots, local.max_len, local.scratch_slot
        self.paged, self.block_size, self.num_blocks = False, local.block_size, local.num_blocks

    @property
    def bytes(self) -> int:
        """The whole pipeline's cache (every layer's part has the same size)."""
        return self.local.bytes // len(self.local.keys) * self.num_layers


def micro_batches(rows: int, count: int) -> list[slice]:
    """`rows` cut into at most `count` near-equal consecutive pieces."""
    count = max(1, min(count, rows))
    bounds = [round(i * rows / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class DistributedPipeline:
    def __init__(self, stage: ReferenceStage | FastStage, process: StageProcess, micro_batch_count: int):
        self.stage, self.process = stage, process
        self.spec: DecoderSpec = stage.spec
        self.micro_batch_count = micro_batch_count
        self.dtype = stage.dtype
        self.closed = False

    @property
    def input_device(self) -> torch.device:
        return self.process.device

    @property
    def alone(self) -> bool:
        return self.process.world_size == 1

    def prepare(self, cache: FrontCache) -> None:
        """Nothing to prepare: the stages run eagerly."""

    def folds_decode_rows(self, rows: int) -> bool:
        """Never: prefill runs chunk by chunk through the ranks."""
        return False

    def padded_decode_rows(self, rows: int, max_batch: int) -> int:
        return max_batch

    def new_cache(self, *, slots: int, max_len: int, blocks: int | None = None) -> FrontCache:
        """Reserved slots whatever `blocks` says: the other ranks hold their parts of the cache
        and never see the engine's block table, so no paging across processes."""
        if not self.alone:
            header = Header(Kind.ALLOCATE, slots=slots, max_len=max_len)
            wait_all(send_all([header.tensor(self.process.device)], 1))
        local = self.stage.new_cache(slots=slots, max_len=max_len)
        return FrontCache(local, self.spec.num_layers)

    def forward_cached(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: FrontCache,
        last_only: bool = False,
    ) -> torch.Tensor:
        """As `Transformer.forward_cached`, through every stage."""
        if self.alone:
            return self.stage.logits(self.first_stage(tokens, positions, slots, cache), last_only)
        pieces = micro_batches(tokens.shape[0], self.micro_batch_count)
        in_flight: InFlight = []
        for piece in pieces:  # each piece is sent on before the next is computed
            piece_positions, piece_slots = positions[piece], slots[piece]
            activations = self.first_stage(tokens[piece], piece_positions, piece_slots, cache)
            header = Header.for_activations(Kind.STEP, activations, last_only)
            device = self.process.device
            metadata = step_metadata(piece_positions, piece_slots, device)
            in_flight += send_all([header.tensor(device), metadata, *activations], 1)
        length = 1 if last_only else tokens.shape[1]
        logits = [self.receive_logits(p.stop - p.start, length) for p in pieces]
        wait_all(in_flight)
        return torch.cat(logits)

    def first_stage(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: FrontCache
    ) -> Activations:
        return self.stage.advance(self.stage.embed(tokens, positions), positions, slots, cache.local)

    def prefill(self, chunks: list[PrefillChunk], cache: FrontCache) -> torch.Tensor:
        return prefill_each(self, chunks, cache)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for positions 0..T-1 without a cache, through every stage."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        activations = self.stage.advance(self.stage.embed(tokens, positions), positions)
        if self.alone:
            return self.stage.logits(activations)
        header = Header.for_activations(Kind.FORWARD, activations)
        in_flight = send_all([header.tensor(self.process.device), *activations], 1)
        logits = self.receive_logits(tokens.shape[0], tokens.shape[1])
        wait_all(in_flight)
        return logits

    def receive_logits(self, rows: int, length: int) -> torch.Tensor:
        shape = (rows, length, self.spec.vocab_size)
        return receive(shape, self.dtype, self.process.world_size - 1, self.process.device, self.process.returns)

    def close(self) -> None:
        """Tell every stage to stop, then leave the process group (once)."""
        if self.closed:
            return
        self.closed = True
        if not self.alone:
            wait_all(send_all([Header(Kind.STOP).tensor(self.process.device)], 1))
        stop_stage_process()
