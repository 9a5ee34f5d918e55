"""Programmatic dependent launch: let each kernel of a decode step start before the one
before it has finished (Hopper and later).

A decode step is about ten kernels a layer, each reading one weight matrix in 10-50
microseconds; between two of them the GPU drains the first, launches the second and ramps
its loads up again, and those gaps are a few percent of the step. With
`launch_pdl=True` the next kernel is launched as soon as every program of the current one
has started (`griddepcontrol.launch_dependents`), and its programs wait
(`griddepcontrol.wait`) for the previous kernel to complete, and its writes to be
visible, before they read an activation or write anything. Weights are never written
during a step, so OVERLAP_PREFETCH also asks L2 for the first lines of the program's
weight rows before waiting.

OVERLAP is a module setting (read when a kernel is launched, so CUDA graphs keep the
choice they were captured with); benchmarks/gpu_fast_path.py measures each mode side by
side (H100, fp16, Llama-2-7B shapes, batch-1 decode):
- pdl+prefetch (gpu_fast_path_h100_fp16_pdl.md): dense 192.0 -> 196.5 tok/s, but sliced 25%
  217.0 -> 213.7, and in a second run dense 190.8 -> 186.5: the next kernel's early programs
  take the SMs a 96- or 128-tile product leaves idle, so its own programs land unevenly;
- pdl+prefetch+late (gpu_fast_path_h100_fp16_pdl_late.md, that second run): dense 190.8 ->
  195.7, sliced 25% 216.2 -> 217.5, batch 16 and prefill up too, the lone shortcut kernel 60%
  -> 69% of copy bandwidth. No row got slower, but it is one run, and the throughput suite
  has not run with it: off stays the default until it has.
Every kernel that may be launched this way waits first, so mixing it with ordinary launches
(cuBLAS, PyTorch) stays correct: those wait for full completion as always.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

OVERLAP_OFF = 0
OVERLAP_WAIT = 1  # launched early, waits before reading
OVERLAP_PREFETCH = 2  # and warms L2 with its first weight lines meanwhile
OVERLAP_LATE = 3  # as 2, but a matrix product lets the next kernel start only after its main loop
OVERLAP_MODES = {
    "off": OVERLAP_OFF,
    "pdl": OVERLAP_WAIT,
    "pdl+prefetch": OVERLAP_PREFETCH,
    "pdl+prefetch+late": OVERLAP_LATE,
}
# The setting; SLICESERVE_KERNEL_OVERLAP=<a key of OVERLAP_MODES> sets it for a whole process.
OVERLAP = OVERLAP_MODES[os.environ.get("SLICESERVE_KERNEL_OVERLAP", "off")]
PREFETCH_BYTES = 1024  # of each weight row: eight 128-byte lines, two 256-wide K-blocks at fp16


@functools.cache
def supports_dependent_launch(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def overlap_mode(device: torch.device) -> int:
    """The mode kernels launched now on `device` use: off on CPUs, in the interpreter and
    before Hopper."""
    if OVERLAP == OVERLAP_OFF or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return OVERLAP_OFF
    index = device.index if device.index is not None else torch.cuda.current_device()
    return OVERLAP if supports_dependent_launch(index) else OVERLAP_OFF


def launch_options(mode: int) -> dict:
    """Extra launch arguments for a kernel compiled with OVERLAP=mode."""
    return {"launch_pdl": True} if mode != OVERLAP_OFF else {}


def prefetch_lines(element_size: int) -> tuple[int, int]:
    """(lines per weight row, elements per 128-byte line) for OVERLAP_PREFETCH."""
    line = 128 // element_size
    return PREFETCH_BYTES // 128, line


@triton.jit
def wait_for_previous_kernel(OVERLAP: tl.constexpr):
    if OVERLAP != 0:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def prefetch_then_wait(w_ptr, stride_w, offs_n, N, K, OVERLAP: tl.constexpr, LINES: tl.constexpr, LINE: tl.constexpr):
    """Ask L2 for the first LINES lines of this program's weight rows, then wait. In the
    late mode the next kernel is released by `main_loop_done` instead, so that its waiting
    programs do not take SMs while this product still streams its weights."""
    if OVERLAP >= 2:  # OVERLAP_PREFETCH or OVERLAP_LATE
        cols = tl.arange(0, LINES) * LINE
        ok = (offs_n[:, None] < N) & (cols[None, :] < K)
        lines = tl.where(ok, w_ptr + offs_n[:, None] * stride_w + cols[None, :], w_ptr)
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; // $0", "=r,l", [lines], dtype=tl.int32, is_pure=False, pack=1
        )
    if OVERLAP == 3:  # OVERLAP_LATE: released by main_loop_done
        gdc_wait()
    else:
        wait_for_previous_kernel(OVERLAP)


@triton.jit
def main_loop_done(OVERLAP: tl.constexpr):
    if OVERLAP == 3:  # OVERLAP_LATE
        gdc_launch_dependents()
