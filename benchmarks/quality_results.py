"""The SmolLM2 quality results (benchmarks/results/smollm2_quality.{json,md}): read them, add or
replace rows, and rewrite both files in the format benchmarks/smollm2_quality.py writes.

Shared by the scripts that add rows to the one table (slicing, pruning), so that each can run
on its own without dropping the others' rows.
"""

from __future__ import annotations

import json
from pathlib import Path

JSON_FILE = "smollm2_quality.json"
MARKDOWN_FILE = "smollm2_quality.md"


def read_results(out_dir: str | Path) -> dict:
    """{"conditions": {...}, "rows": [...]}, empty when there are no results yet."""
    path = Path(out_dir) / JSON_FILE
    return json.loads(path.read_text()) if path.is_file() else {"conditions": {}, "rows": []}


def merge_rows(rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """`rows` with each new row replacing the row of the same model label, or appended. A column
    the new row did not measure (None or absent) keeps the earlier figure: rerunning some
    sparsities without the whole split must not erase a whole-split score."""
    merged = list(rows)
    for new in new_rows:
        labels = [row["model"] for row in merged]
        if new["model"] in labels:
            i = labels.index(new["model"])
            merged[i] = merged[i] | {k: v for k, v in new.items() if v is not None}
        else:
            merged.append(new)
    return merged


def write_results(out_dir: str | Path, conditions: dict, rows: list[dict], windows: int) -> str:
    """Write the JSON and the markdown table; returns the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_FILE).write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=2) + "\n")
    pruned = any(row.get("pattern") for row in rows)
    title = "dense, sliced and 2:4-pruned" if pruned else "dense and sliced"
    lines = [f"# SmolLM2-135M: WikiText-2 perplexity, {title}", ""]
    lines += [f"- {k}: {v}" for k, v in conditions.items()] + [""]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    # (header, cell); the optional columns appear only once some row has a figure for them
    columns = [
        ("model", lambda r: r["model"]),
        ("parameters", lambda r: f"{r['parameters']:,}"),
        *([("non-zero parameters", lambda r: fmt(r.get("nonzero_parameters"), ","))] if pruned else []),
        ("checkpoint bytes", lambda r: fmt(r["checkpoint_bytes"], ",")),
        ("slicing / pruning s" if pruned else "slicing s", lambda r: fmt(r["slicing_seconds"], "")),
    ]
    if any(row.get("finetuning_seconds") is not None for row in rows):
        columns.append(("fine-tuning s", lambda r: fmt(r.get("finetuning_seconds"), "")))
    if any(row.get("ppl_2") is not None for row in rows):
        columns.append(("ppl (first 2 windows)", lambda r: fmt(r.get("ppl_2"), ".3f")))
    columns += [
        (f"ppl (first {windows} windows)", lambda r: fmt(r["ppl_16"], ".3f")),
        ("ppl (whole test split)", lambda r: fmt(r["ppl_full"], ".3f")),
    ]
    lines += [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "| --- |" + " ---: |" * (len(columns) - 1),
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    (out_dir / MARKDOWN_FILE).write_text(markdown)
    return markdown
