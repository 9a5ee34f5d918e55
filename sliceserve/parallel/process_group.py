"""Joining the torchrun job: rank, world size, device and backend of this stage's process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sliceserve.errors import SliceserveError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# A stage waits for work for as long as the server is up; the default 30 minutes would end
# an idle server's stages (gloo raises, NCCL's watchdog aborts).
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class StageProcess:
    rank: int
    world_size: int
    device: torch.device
    backend: str  # gloo | nccl
    # The logits go back to rank 0 through a group of their own: NCCL runs each group's
    # sends and receives in issue order on one stream, so with two ranks the logits coming
    # back would otherwise queue behind rank 0's next micro-batch going out, and wait forever.
    returns: Any = None

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def process_rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def start_stage_process(device: str) -> StageProcess:
    """Join the job: `--device cuda` gives each process the GPU of its local rank (NCCL),
    `--device cpu` keeps every process on the CPU (gloo)."""
    if not launched_by_torchrun():
        raise SliceserveError(
            "--distributed runs one process per stage: launch with "
            "torchrun --nproc-per-node N -m sliceserve ... --distributed"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise SliceserveError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        stage_device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(stage_device)
    elif device == "cpu":
        stage_device, backend = torch.device("cpu"), "gloo"
    else:
        raise SliceserveError(f"--distributed takes --device cpu or cuda, not {device}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=IDLE_TIMEOUT)
    returns = dist.new_group(backend=backend, timeout=IDLE_TIMEOUT)  # every rank creates it, in the same order
    return StageProcess(rank, world_size, stage_device, backend, returns)


def stop_stage_process() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
