"""Which matrix products the fast path runs: our fused Triton kernels, the vendor library
(cuBLAS, fast/library_matmul.py), or "auto", the faster of the two by batch rows.

Measured on an H100 (fp16, Llama-2-7B shapes; benchmarks/results/):
- up to 16 rows the Triton kernels read the weights at 85-92% of copy bandwidth and fuse
  the norm, shortcut and residual into the products: batch-1 decode 191 tok/s against 147
  with cuBLAS (gpu_fast_path_h100_fp16_auto.md);
- from 32 rows cuBLAS reads 59-88% where our best tiles read 43-82%
  (middle_tiles_sweep.md), and a 2048-token prefill runs at 60% of the matrix rate with
  cuBLAS against 55% with our kernels.
So "auto" hands a product of more than 16 rows to the library. End to end it shows in the
throughput suite (throughput_llama-2-7b_auto.md against throughput_llama-2-7b.md): a sliced
25% model decodes 32-256 rows at 1.04-1.07x the dense one's speed with "auto", 0.90-0.98x
with our kernels at every size. Both backends take the same
arguments and produce the same partial sums of squares (any number of columns), so the
layers do not care which one wrote their input. Both take quantized weights too: our kernels
dequantize them inside the product, the library path into a float weight per product first
(so "auto" runs a quantized checkpoint's decode from its codes, its prefill at library speed).
"""

from __future__ import annotations

import torch

from sliceserve.fast.library_matmul import library_gated, library_linear
from sliceserve.kernels.fused_linear import DECODE_TILES, fused_linear
from sliceserve.kernels.gated_linear import gated_linear

AUTO_TRITON_ROWS = DECODE_TILES.block_m


def auto_linear(a: torch.Tensor, w: torch.Tensor, **options):
    return (fused_linear if a.shape[0] <= AUTO_TRITON_ROWS else library_linear)(a, w, **options)


def auto_gated(a: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, **options):
    return (gated_linear if a.shape[0] <= AUTO_TRITON_ROWS else library_gated)(a, gate, up, **options)


PRODUCTS = {
    "auto": (auto_linear, auto_gated),
    "triton": (fused_linear, gated_linear),
    "library": (library_linear, library_gated),
}
