"""The loop of every rank but the first: receive, run this stage's layers, send on."""

from __future__ import annotations

import logging

import torch

from sliceserve.distributed.messages import (
    Header,
    InFlight,
    Kind,
    receive,
    receive_header,
    send_all,
    split_metadata,
    still_sending,
    wait_all,
)
from sliceserve.distributed.process_group import StageProcess
from sliceserve.runtime.kv_cache import KVCache
from sliceserve.runtime.model import Transformer
from sliceserve.runtime.pipeline import cache_rows, run_blocks, stage_cache

log = logging.getLogger("sliceserve")


@torch.inference_mode()
def serve_stage(stage: Transformer, layers: range, process: StageProcess) -> None:
    """Serve messages from the previous rank until STOP. Each message is handled in arrival
    order; sends are started and left to finish while the next message is received, so this
    stage works on one micro-batch while the next stage works on the one before."""
    device, previous, following = process.device, process.rank - 1, process.rank + 1
    width_in = stage.spec.layers[layers.start - 1].output_width
    dtype = next(stage.parameters()).dtype
    cache: KVCache | None = None
    in_flight: InFlight = []
    while True:
        header = receive_header(previous, device)
        if header.kind in (Kind.STOP, Kind.ALLOCATE):
            if header.kind == Kind.ALLOCATE:
                cache = stage_cache(stage, device, slots=header.slots, max_len=header.max_len)
            if not process.is_last:
                in_flight += send_all([header.tensor(device)], following)
            if header.kind == Kind.STOP:
                break
            continue
        forwarded = [header.tensor(device)]
        if header.kind == Kind.STEP:
            if cache is None:
                raise RuntimeError("a cached step arrived before the KV cache was allocated")
            meta = receive((header.rows * header.length + header.rows,), torch.int64, previous, device)
            positions, slots = split_metadata(meta, header.rows, header.length)
            rows, forwarded = cache_rows(slots, positions), forwarded + [meta]
        else:
            positions, rows = torch.arange(header.length, device=device), None
        if header.width != width_in:
            raise RuntimeError(f"stage {process.rank} reads width {width_in}, was sent width {header.width}")
        x = receive((header.rows, header.length, width_in), dtype, previous, device)
        x = run_blocks(stage, x, positions, rows, cache if header.kind == Kind.STEP else None)
        if process.is_last:
            logits = stage.final_logits(x[:, -1:] if header.last_only else x)
            in_flight += send_all([logits], 0, group=process.returns)
        else:
            header = Header(header.kind, header.rows, header.length, header.last_only, x.shape[-1])
            in_flight += send_all([header.tensor(device), *forwarded[1:], x], following)
        in_flight = still_sending(in_flight)
    wait_all(in_flight)
    log.info("stage %d stopped", process.rank)
