"""The throughput suite's CPU-checkable parts (benchmarks/throughput_suite.py and
throughput_report.py): magnitude 2:4 pruning, the Table 11 doubling loop, and the markdown
and plots rendered from a result. The measurements themselves need a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import kernel_support  # noqa: F401  (sets TRITON_INTERPRET before the suite's imports load Triton kernels)
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import throughput_report as report  # noqa: E402
import throughput_suite as suite  # noqa: E402
from random_models import llama_spec, prune_decoder_two_four, random_transformer, two_four_by_magnitude  # noqa: E402

from sliceserve.fast.semi_structured import check_two_four  # noqa: E402


def test_two_four_keeps_exactly_the_two_largest_of_every_group_of_four():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    pruned = two_four_by_magnitude(weight)
    groups, original = pruned.reshape(16, -1, 4), weight.reshape(16, -1, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    kept = original.abs().sort(-1, descending=True).values[..., :2]
    assert torch.equal(groups.abs().sort(-1, descending=True).values[..., :2], kept)
    assert torch.equal(pruned[pruned != 0], weight[pruned != 0])  # kept values unchanged
    assert pruned.dtype == weight.dtype and pruned.shape == weight.shape


def test_pruning_a_model_makes_every_decoder_linear_two_four_and_leaves_embedding_and_head():
    model = random_transformer(llama_spec("tiny"), dtype=torch.float32, device="cpu")
    embed, head = model.embed.weight.clone(), model.head.weight.clone()
    prune_decoder_two_four(model)
    for i, block in enumerate(model.layers):
        for name in ("q", "k", "v", "o"):
            check_two_four(f"layers.{i}.attn.{name}", getattr(block.attn, name).weight)
        for name in ("gate", "up", "down"):
            check_two_four(f"layers.{i}.mlp.{name}", getattr(block.mlp, name).weight)
        assert (block.mlp.down.weight == 0).float().mean() == 0.5
    assert torch.equal(model.embed.weight, embed) and torch.equal(model.head.weight, head)


def fake_measure(throughputs: dict[int, float], oom_at: int, error=None):
    calls = []

    def measure(batch: int) -> dict:
        calls.append(batch)
        if batch == oom_at:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"batch": batch, "end_to_end_tok_s": throughputs[batch]}

    return measure, calls


def test_doubling_stops_at_the_first_out_of_memory_and_reports_the_best():
    measure, calls = fake_measure({1: 10.0, 2: 19.0, 4: 35.0, 8: 50.0, 16: 48.0}, oom_at=32)
    seen = []
    outcome = suite.double_until_oom(measure, cap=1024, on_row=seen.append)
    assert calls == [1, 2, 4, 8, 16, 32]
    assert [r["batch"] for r in outcome["rows"]] == [1, 2, 4, 8, 16] and seen == outcome["rows"]
    assert outcome["stop"] == "out of memory at batch 32" and outcome["out_of_memory_at"] == 32
    assert report.best_of(outcome["rows"]) == {"tok_s": 50.0, "batch": 8, "largest_batch": 16}


def test_an_out_of_memory_hidden_behind_another_error_still_ends_the_doubling_as_such():
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        except RuntimeError as inner:
            raise RuntimeError("operation failed due to a previous error during capture") from inner
    except RuntimeError as error:
        capture_error = error
    measure, _ = fake_measure({1: 1.0}, oom_at=2, error=capture_error)
    assert suite.double_until_oom(measure, cap=8)["out_of_memory_at"] == 2


def test_other_errors_the_cap_and_the_time_budget_end_the_doubling_with_their_reason():
    measure, _ = fake_measure({1: 1.0, 2: 2.0}, oom_at=4, error=ValueError("bad shape"))
    outcome = suite.double_until_oom(measure, cap=64)
    assert outcome["stop"] == "error at batch 4: ValueError: bad shape" and outcome["out_of_memory_at"] is None
    measure, calls = fake_measure({1: 1.0, 2: 2.0, 4: 3.0}, oom_at=8)
    assert suite.double_until_oom(measure, cap=4)["stop"] == "cap of 4 reached" and calls == [1, 2, 4]
    outcome = suite.double_until_oom(measure, cap=4, out_of_time=lambda: True)
    assert outcome["rows"] == [] and outcome["stop"].startswith("time budget")
    assert report.best_of([]) == {"tok_s": None, "batch": None, "largest_batch": None}


def row(batch: int, decode: float, peak_gib: float, joules: float | None = 0.5) -> dict:
    return {
        "batch": batch,
        "prompt": 128,
        "new_tokens": 128,
        "prefill_s": 0.1,
        "prefill_tok_s": 1000.0 * batch,
        "decode_s": 1.0,
        "decode_tok_s": decode,
        "ms_per_step": 7.8,
        "end_to_end_tok_s": decode * 0.9,
        "ttft_ms": 20.0,
        "peak_allocated_bytes": int(peak_gib * report.GIB),
        "energy": None if joules is None else {"J_per_token_counter": joules, "mean_W_counter": 400.0},
    }


def budget(rows: list[dict], stop: str, oom_at: int | None, budget_bytes=None) -> dict:
    return {
        "budget_bytes": budget_bytes,
        "rows": rows,
        "stop": stop,
        "out_of_memory_at": oom_at,
        "best": report.best_of(rows),
    }


def fake_result() -> dict:
    conditions = {
        "shape": "llama-2-13b",
        "dtype": "float16",
        "device": "NVIDIA H100 80GB HBM3",
        "device_memory_bytes": 80 * report.GIB,
        "prompt": 128,
        "new_tokens": 128,
        "versions": {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"},
        "date": "2026-11-23 12:00 UTC",
    }
    dense = {
        "sparsity": 0.0,
        "two_four": False,
        "residual_width": 5120,
        "resident_bytes": 25 * report.GIB,
        "build_s": 3.0,
        "budgets": {
            "whole card": budget([row(1, 100.0, 26), row(2, 190.0, 27)], "out of memory at batch 4", 4),
            "24 GiB": budget([], "out of memory at batch 1", 1, 24 * report.GIB),
        },
    }
    sliced = {
        "sparsity": 0.25,
        "two_four": False,
        "residual_width": 3840,
        "resident_bytes": 21 * report.GIB,
        "build_s": 3.0,
        "budgets": {
            "whole card": budget(
                [row(1, 120.0, 22), row(2, 228.0, 23), row(4, 400.0, 24)], "out of memory at batch 8", 8
            ),
            "24 GiB": budget([row(1, 120.0, 22)], "out of memory at batch 2", 2, 24 * report.GIB),
        },
    }
    two_four = {
        "sparsity": 0.0,
        "two_four": True,
        "error": "could not build: RuntimeError: cuSPARSELt not available",
        "budgets": {},
    }
    return {
        "conditions": conditions,
        "variants": {"dense": dense, "sliced 25%": sliced, "2:4": two_four},
        "hf_generate": [
            {"batch": 1, "prompt": 128, "new_tokens": 128, "seconds": 10.0, "tok_s": 10.0, "energy": None},
            {"batch": 16, "error": "out of memory"},
        ],
    }


def test_rendering_writes_tables_with_ratios_out_of_memory_cells_and_plots(tmp_path):
    written = report.write_outputs(fake_result(), tmp_path, plots=True)
    md = (tmp_path / "throughput_llama-2-13b.md").read_text()
    lines = md.splitlines()
    assert "| batch | dense | sliced 25% | sliced 25% / dense |" in lines
    assert "| 1 | 100 | 120 | 1.20x |" in lines  # decode tok/s at batch 1
    assert "| 2 | 190 | 228 | 1.20x |" in lines
    assert "| 4 | OOM | 400 | — |" in lines  # dense ran out of memory at 4
    assert "| 1 | 26.00 | 22.00 | 0.85x |" in lines  # peak memory
    assert "| 1 | 0.500 | 0.500 | 1.00x |" in lines  # J/token from the energy counter
    # Table 11: best end-to-end (0.9 x decode) and the batch that reached it; dense fits no batch under 24 GiB
    assert "| whole card | sliced 25% | 360 | 4 | 4 | out of memory at batch 8 | 2.11x |" in lines
    assert "| 24 GiB | dense | no batch fits | — | — | out of memory at batch 1 | — |" in lines
    assert any("cuSPARSELt not available" in line for line in lines)
    assert "| 1 | 10.0 | — | 90 | 9.0x |" in lines  # ours end-to-end against Transformers generate
    saved = json.loads((tmp_path / "throughput_llama-2-13b.json").read_text())
    assert saved["variants"]["dense"]["residual_width"] == 5120
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    pngs = [p for p in written if p.suffix == ".png"]
    assert sorted(p.name for p in pngs) == ["throughput_llama-2-13b_memory.png", "throughput_llama-2-13b_tokps.png"]
    assert all(p.stat().st_size > 10_000 for p in pngs)


def test_render_merges_runs_split_over_several_calls(tmp_path):
    full = fake_result()
    first = {**full, "variants": {"dense": full["variants"]["dense"]}, "hf_generate": []}
    second = {**full, "variants": {"sliced 25%": full["variants"]["sliced 25%"]}}
    for name, part in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(part))
    report.render_files([str(tmp_path / "a.json"), str(tmp_path / "b.json")], str(tmp_path / "merged"))
    merged = json.loads((tmp_path / "merged" / "throughput_llama-2-13b.json").read_text())
    assert list(merged["variants"]) == ["dense", "sliced 25%"] and len(merged["hf_generate"]) == 2
    assert merged["conditions"]["merged_runs"] == ["2026-11-23 12:00 UTC"] * 2
    assert "| 1 | 100 | 120 | 1.20x |" in (tmp_path / "merged" / "throughput_llama-2-13b.md").read_text()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--quick"], {"shape": "tiny", "max_batch": 4, "new_tokens": 8, "out_dir": "benchmarks/results"}),
        (
            ["--shape", "llama-2-13b"],
            {
                "shape": "llama-2-13b",
                "prompt": 128,
                "new_tokens": 128,
                "budget_gib": 24.0,
                "variants": ["dense", "sliced25", "2:4", "sliced30"],
            },
        ),
        (["--render", "x.json"], {"render": ["x.json"], "out_dir": None}),
    ],
)
def test_command_line(argv, expected):
    args = suite.parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected
