"""The quality table's row merging: a rerun of some rows must not erase figures it did not measure."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from quality_results import merge_rows, read_results, write_results  # noqa: E402


def test_a_rerun_keeps_the_whole_split_score_it_did_not_measure(tmp_path):
    old = [
        {
            "model": "dense",
            "parameters": 10,
            "checkpoint_bytes": None,
            "slicing_seconds": None,
            "ppl_16": 20.0,
            "ppl_full": 21.0,
        },
        {
            "model": "SparseGPT 2:4",
            "parameters": 10,
            "nonzero_parameters": 5,
            "pattern": "2:4",
            "checkpoint_bytes": 40,
            "slicing_seconds": 3.0,
            "ppl_16": 50.0,
            "ppl_full": 60.0,
        },
    ]
    new = [
        {
            "model": "dense",
            "parameters": 10,
            "checkpoint_bytes": None,
            "slicing_seconds": None,
            "ppl_16": 20.5,
            "ppl_full": None,
        },
        {
            "model": "SliceGPT 10%",
            "parameters": 8,
            "checkpoint_bytes": 32,
            "slicing_seconds": 2.0,
            "ppl_16": 28.0,
            "ppl_full": 30.0,
        },
    ]
    merged = merge_rows(old, new)
    assert [r["model"] for r in merged] == ["dense", "SparseGPT 2:4", "SliceGPT 10%"]
    assert merged[0]["ppl_16"] == 20.5 and merged[0]["ppl_full"] == 21.0
    assert merged[1] == old[1]
    markdown = write_results(tmp_path, {"pruning": "2:4"}, merged, windows=16)
    assert "| dense | 10 |  |  |  | 20.500 | 21.000 |" in markdown
    assert read_results(tmp_path)["rows"] == merged
