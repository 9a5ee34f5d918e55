"""The loop of every rank but the first: receive, run this stage's layers, send on."""

from __future__ import annotations

import logging

import torch

from sliceserve.model.kv_cache import KVCache
from sliceserve.parallel.messages import (
    Header,
    InFlight,
    Kind,
    receive,
    receive_activations,
    receive_header,
    send_all,
    split_metadata,
    still_sending,
    wait_all,
)
from sliceserve.parallel.process_group import StageProcess
from sliceserve.parallel.stages import FastStage, ReferenceStage

log = logging.getLogger("sliceserve")


@torch.inference_mode()
def serve_stage(stage: ReferenceStage | FastStage, layers: range, process: StageProcess) -> None:
    """Serve messages from the previous rank until STOP. Each message is handled in arrival
    order; sends are started and left to finish while the next message is received, so this
    stage works on one micro-batch while the next stage works on the one before."""
    device, previous, following = process.device, process.rank - 1, process.rank + 1
    width_in = stage.spec.layers[layers.start - 1].output_width
    dtype = stage.dtype
    cache: KVCache | None = None
    in_flight: InFlight = []
    while True:
        header = receive_header(previous, device)
        if header.kind in (Kind.STOP, Kind.ALLOCATE):
            if header.kind == Kind.ALLOCATE:
                cache = stage.new_cache(slots=header.slots, max_len=header.max_len)
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
            forwarded = forwarded + [meta]
        else:
            positions, slots = torch.arange(header.length, device=device), None
        if header.width != width_in:
            raise RuntimeError(f"stage {process.rank} reads width {width_in}, was sent width {header.width}")
        if bool(header.partials) != stage.fast:  # every rank decides its path from the same options
            raise RuntimeError(
                f"stage {process.rank} runs the {'fast' if stage.fast else 'reference'} path, "
                f"the rank before it does not"
            )
        activations = receive_activations(header, width_in, dtype, previous, device)
        activations = stage.advance(activations, positions, slots, cache if header.kind == Kind.STEP else None)
        if process.is_last:
            in_flight += send_all([stage.logits(activations, header.last_only)], 0, group=process.returns)
        else:
            header = Header.for_activations(header.kind, activations, header.last_only)
            in_flight += send_all([header.tensor(device), *forwarded[1:], *activations], following)
        in_flight = still_sending(in_flight)
    wait_all(in_flight)
    log.info("stage %d stopped", process.rank)
