"""What travels between stages: a fixed header of 8 integers, then (for a step) the rows'
positions and slots, then the stream itself.

    ALLOCATE  slots, max_len                  every stage makes its KV cache
    STEP      rows, length, last_only, width, partials
                                              + int64 [positions (rows*length), slots (rows)]
                                              + activations (rows, length, width)
                                              + on the fast path, their partial sums of
                                                squares (rows, length, partials), float32
    FORWARD   rows, length, width, partials   + the same stream (no cache, positions 0..length-1)
    STOP                                      every stage ends its loop

The last stage answers a STEP or FORWARD with the logits, sent to rank 0 through the
process's `returns` group. Tensors live on the stage's device (NCCL sends GPU tensors only;
gloo sends CPU ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

HEADER_SIZE = 8


class Kind(IntEnum):
    ALLOCATE = 1
    STEP = 2
    FORWARD = 3
    STOP = 4


@dataclass
class Header:
    kind: Kind
    rows: int = 0
    length: int = 0
    last_only: bool = False
    width: int = 0
    slots: int = 0
    max_len: int = 0
    partials: int = 0  # columns of the partial sums of squares sent after the stream (fast path), else 0

    def tensor(self, device: torch.device) -> torch.Tensor:
        values = [
            int(self.kind),
            self.rows,
            self.length,
            int(self.last_only),
            self.width,
            self.slots,
            self.max_len,
            self.partials,
        ]
        return torch.tensor(values, dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Header:
        kind, rows, length, last_only, width, slots, max_len, partials = tensor.tolist()
        return cls(Kind(kind), rows, length, bool(last_only), width, slots, max_len, partials)

    @classmethod
    def for_activations(cls, kind: Kind, stream: list[torch.Tensor], last_only: bool = False) -> Header:
        """The header announcing a stream (rows, length, width[, partial sums' columns])."""
        x = stream[0]
        partials = stream[1].shape[-1] if len(stream) > 1 else 0
        return cls(kind, x.shape[0], x.shape[1], last_only, x.shape[-1], partials=partials)


InFlight = list[tuple[dist.Work, torch.Tensor]]  # sends under way, with the tensors they read


def send_all(tensors: list[torch.Tensor], dst: int, group: Any = None) -> InFlight:
    """Start sending each tensor to `dst`, in order; the caller keeps the result until done."""
    contiguous = [t.contiguous() for t in tensors]
    return [(dist.isend(t, dst, group=group), t) for t in contiguous]


def wait_all(in_flight: InFlight) -> None:
    for work, _ in in_flight:
        work.wait()


def still_sending(in_flight: InFlight) -> InFlight:
    return [(work, t) for work, t in in_flight if not work.is_completed()]


def receive(
    shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device, group: Any = None
) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(tensor, src, group=group)
    return tensor


def receive_header(src: int, device: torch.device) -> Header:
    return Header.from_tensor(receive((HEADER_SIZE,), torch.int64, src, device))


def receive_activations(
    header: Header, width: int, dtype: torch.dtype, src: int, device: torch.device
) -> list[torch.Tensor]:
    """The activations a header announces, and their partial sums of squares when it says so."""
    stream = [receive((header.rows, header.length, width), dtype, src, device)]
    if header.partials:
        stream.append(receive((header.rows, header.length, header.partials), torch.float32, src, device))
    return stream


def step_metadata(positions: torch.Tensor, slots: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([positions.reshape(-1), slots.reshape(-1)]).to(device=device, dtype=torch.int64)


def split_metadata(meta: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return meta[: rows * length].view(rows, length), meta[rows * length :]
