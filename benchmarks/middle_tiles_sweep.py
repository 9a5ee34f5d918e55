"""Which tiles should the fast path use for 17-128 rows (decode of batches 32-128)?

Below 17 rows the decode tiles stream the weights at ~85-90% of copy bandwidth; above,
the fast path used the prefill tiles (128 x 128), which waste most of each tile at 32
rows and leave few programs per SM on the narrow sliced matrices. This times one
fused_linear per Llama-2-7B matrix shape (dense and sliced 25%) at 32, 64 and 128 rows
for a handful of candidate tiles and cuBLAS, reading rotating copies of the weight so
that L2 does not serve it, and writes JSON and a markdown table.

    PYTHONPATH=. python benchmarks/middle_tiles_sweep.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import versions, write_json
from gpu_fast_path import ceilings, graph_ms, rotating

from sliceserve.kernels.fused_linear import PREFILL_TILES, TileConfig, fused_linear

SHAPES = ((4096, 4096), (12288, 4096), (11008, 4096), (4096, 11008), (3072, 3072), (11008, 3072), (3072, 11008))
ROWS = (32, 64, 128)
CANDIDATES = (
    TileConfig(32, 32, 128, 4, 4),
    TileConfig(32, 64, 128, 4, 4),
    TileConfig(64, 32, 128, 4, 4),
    TileConfig(64, 64, 128, 4, 4),
    TileConfig(64, 32, 256, 4, 3),
    TileConfig(128, 32, 128, 4, 3),
    TileConfig(128, 64, 64, 4, 4),
    PREFILL_TILES,
)


def sweep(dtype: torch.dtype, copy_gbps: float) -> list[dict]:
    results = []
    for n, k in SHAPES:
        copies = max(2, int(400e6 // (n * k * 2)) + 1)
        ws = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), copies)
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            candidates = [(t.__dict__, lambda t=t: [fused_linear(x, w, tiles=t) for w in ws]) for t in CANDIDATES]
            candidates.append(("cublas", lambda: [x @ w.T for w in ws]))
            for tiles, fn in candidates:
                row = {"n": n, "k": k, "rows": rows, "tiles": tiles}
                try:
                    ms = graph_ms(fn, inner=5) / copies
                except Exception as error:  # out of shared memory, say
                    results.append(row | {"error": str(error)[:100]})
                    continue
                results.append(row | {"ms": ms, "fraction_of_copy_bw": n * k * 2 / (ms / 1e3) / 1e9 / copy_gbps})
            print(json.dumps([r for r in results if r["rows"] == rows and r["n"] == n and r["k"] == k]), flush=True)
        del ws
    return results


def markdown(result: dict) -> str:
    lines = ["# fused_linear at 32-128 rows: fraction of copy bandwidth per tile shape", ""]
    lines += [f"- {k}: {v}" for k, v in result["conditions"].items()] + [""]
    names = []
    for r in result["sweep"]:
        name = (
            "cublas"
            if r["tiles"] == "cublas"
            else "{block_m}x{block_n}x{block_k} w{num_warps} s{num_stages}".format(**r["tiles"])
        )
        r["name"] = name
        if name not in names:
            names.append(name)
    lines += ["| n x k | rows | " + " | ".join(names) + " |", "| --- | ---: |" + " ---: |" * len(names)]
    keys = sorted({(r["n"], r["k"], r["rows"]) for r in result["sweep"]}, key=lambda t: (t[0] * t[1], t[0], t[2]))
    for n, k, rows in keys:
        cells = {
            r["name"]: (f"{r['fraction_of_copy_bw']:.0%}" if "ms" in r else "error")
            for r in result["sweep"]
            if (r["n"], r["k"], r["rows"]) == (n, k, rows)
        }
        lines.append(f"| {n} x {k} | {rows} | " + " | ".join(cells.get(name, "") for name in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    limits = ceilings()
    result = {
        "conditions": {
            "device": torch.cuda.get_device_name(),
            "dtype": "float16",
            "weights": "random, rotating copies (> 400 MB) so L2 does not hold them",
            "timing": "CUDA graph of one product per copy, median of 10 replays",
            "measured_copy_GBps": round(limits["copy_GBps"]),
            "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    }
    result["sweep"] = sweep(torch.float16, limits["copy_GBps"])
    write_json(out_dir / "middle_tiles_sweep.json", result)
    (out_dir / "middle_tiles_sweep.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
