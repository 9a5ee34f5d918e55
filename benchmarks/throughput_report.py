"""Markdown tables and PNG plots from a throughput-suite result (benchmarks/throughput_suite.py).

Pure functions of the result dict: they run on any machine (matplotlib, where installed,
draws the plots; `pip install matplotlib`), so a result fetched from the GPU machine can be
rendered again, or several partial runs of one shape merged, with
`python benchmarks/throughput_suite.py --render a.json [b.json] --out-dir DIR`.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

GIB = 2**30


def best_of(rows: list[dict], key: str = "end_to_end_tok_s") -> dict:
    """The Table 11 figure: the best throughput over the doubling and the batch that reached it."""
    if not rows:
        return {"tok_s": None, "batch": None, "largest_batch": None}
    best = max(rows, key=lambda row: row[key])
    return {"tok_s": best[key], "batch": best["batch"], "largest_batch": max(row["batch"] for row in rows)}


def joules_per_token(energy: dict | None) -> float | None:
    """The energy counter where the board has one, else the sampled mean power."""
    if not energy:
        return None
    return energy.get("J_per_token_counter", energy.get("J_per_token_sampled"))


def stem(result: dict) -> str:
    tag = result["conditions"].get("tag")
    return f"throughput_{result['conditions']['shape']}" + (f"_{tag}" if tag else "")


def budget_rows(result: dict, budget: str) -> dict[str, dict]:
    """variant label -> its record under `budget`, for variants that have one."""
    return {label: v["budgets"][budget] for label, v in result["variants"].items() if budget in v.get("budgets", {})}


def budget_labels(result: dict) -> list[str]:
    labels = []
    for v in result["variants"].values():
        labels += [b for b in v.get("budgets", {}) if b not in labels]
    return labels


def number(value: float, digits: int) -> str:
    """Thousands separated, with two decimals at least below 10 (small figures stay legible)."""
    return f"{value:,.{max(digits, 2) if abs(value) < 10 else digits}f}"


def metric_table(result: dict, budget: str, value: Callable[[dict], float | None], digits: int) -> list[str]:
    """| batch | each variant | each variant / dense |: 'OOM' where a variant ran out of memory
    at or below that batch, a dash where it was not measured."""
    records = budget_rows(result, budget)
    labels = [label for label, r in records.items() if r["rows"] or r.get("out_of_memory_at")]
    if not labels:
        return ["(no measurements)"]
    by_batch = {label: {row["batch"]: row for row in records[label]["rows"]} for label in labels}
    batches = sorted({b for rows in by_batch.values() for b in rows})
    others = [label for label in labels if label != "dense"] if "dense" in labels else []

    def cell(label: str, batch: int) -> tuple[str, float | None]:
        row = by_batch[label].get(batch)
        if row is None:
            oom = records[label].get("out_of_memory_at")
            return ("OOM" if oom is not None and batch >= oom else "—"), None
        v = value(row)
        return ("—" if v is None else number(v, digits)), v

    lines = [
        "| batch | " + " | ".join(labels) + "".join(f" | {o} / dense" for o in others) + " |",
        "| ---: " * (1 + len(labels) + len(others)) + "|",
    ]
    for batch in batches:
        cells = {label: cell(label, batch) for label in labels}
        ratios = []
        for other in others:
            a, b = cells[other][1], cells["dense"][1]
            ratios.append(f"{a / b:.2f}x" if a is not None and b else "—")
        lines.append(
            f"| {batch} | "
            + " | ".join(cells[label][0] for label in labels)
            + "".join(f" | {r}" for r in ratios)
            + " |"
        )
    return lines


METRICS = [  # title, value of a row, digits
    ("Decode throughput, tokens/s (higher is better)", lambda r: r["decode_tok_s"], 0),
    (
        "End-to-end throughput, the paper's Table 11 method: batch x new tokens / (prefill + decode), tokens/s",
        lambda r: r["end_to_end_tok_s"],
        0,
    ),
    ("Prefill throughput, prompt tokens/s", lambda r: r["prefill_tok_s"], 0),
    (
        "Time to first token: one prompt's prefill + one decode step of the batch, ms (lower is better)",
        lambda r: r["ttft_ms"],
        1,
    ),
    (
        "Peak GPU memory, GiB (weights included; lower is better)",
        lambda r: r["peak_allocated_bytes"] / GIB if r.get("peak_allocated_bytes") is not None else None,
        2,
    ),
    ("Energy per generated token during decode, J (lower is better)", lambda r: joules_per_token(r.get("energy")), 3),
    (
        "Mean GPU power during decode, W",
        lambda r: (r.get("energy") or {}).get("mean_W_counter", (r.get("energy") or {}).get("mean_W")),
        0,
    ),
]


def table11_lines(result: dict) -> list[str]:
    lines = [
        "| budget | variant | best tok/s | at batch | largest batch that fit | stopped | best / dense best |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for budget in budget_labels(result):
        records = budget_rows(result, budget)
        dense_best = (records.get("dense", {}).get("best") or {}).get("tok_s")
        for label, record in records.items():
            best = record.get("best") or best_of(record["rows"])
            if best["tok_s"] is None:
                what = "skipped" if record["stop"].startswith("skipped") else "no batch fits"
                lines.append(f"| {budget} | {label} | {what} | — | — | {record['stop']} | — |")
                continue
            ratio = f"{best['tok_s'] / dense_best:.2f}x" if dense_best else "—"
            lines.append(
                f"| {budget} | {label} | {best['tok_s']:,.0f} | {best['batch']} | {best['largest_batch']} "
                f"| {record['stop']} | {ratio} |"
            )
    return lines


def models_lines(result: dict) -> list[str]:
    lines = [
        "| variant | residual width | GPU memory after build, GiB | build s | note |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label, v in result["variants"].items():
        resident = f"{v['resident_bytes'] / GIB:.2f}" if v.get("resident_bytes") is not None else "—"
        note = v.get("error") or ""
        if v.get("check"):
            error = v["check"]["vs_dense_kernels_rel_error"]
            note = f"logits against our dense kernels on the same pruned weights: relative error {error:.1e}"
        build = f"{v['build_s']:.1f}" if v.get("build_s") is not None else "—"
        lines.append(f"| {label} | {v.get('residual_width', '—')} | {resident} | {build} | {note} |")
    return lines


def hf_lines(result: dict) -> list[str]:
    whole = budget_rows(result, "whole card").get("dense", {"rows": []})
    ours = {row["batch"]: row for row in whole["rows"]}
    lines = [
        "| batch | Transformers generate tok/s | its J/token | ours dense, end-to-end tok/s | ours / Transformers |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for hf in result.get("hf_generate", []):
        if "error" in hf:
            lines.append(f"| {hf.get('batch', '—')} | {hf['error']} | — | — | — |")
            continue
        mine = ours.get(hf["batch"])
        # comparable only when both ran the same prompt and generation lengths
        same = mine is not None and mine["new_tokens"] == hf["new_tokens"] and mine["prompt"] == hf["prompt"]
        ours_tok_s = f"{mine['end_to_end_tok_s']:,.0f}" if same else "—"
        ratio = f"{mine['end_to_end_tok_s'] / hf['tok_s']:.1f}x" if same else "—"
        j = joules_per_token(hf.get("energy"))
        joules = "—" if j is None else f"{j:.3f}"
        lines.append(f"| {hf['batch']} | {hf['tok_s']:,.1f} | {joules} | {ours_tok_s} | {ratio} |")
    return lines


def render_markdown(result: dict) -> str:
    c = result["conditions"]
    lines = [f"# Throughput: {c['shape']} shapes, random weights, {c['dtype']}: dense, sliced, 2:4", ""]
    lines += [f"- {k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in c.items()] + [""]
    lines += ["## Models", ""] + models_lines(result) + [""]
    lines += ["## The paper's Table 11 method: batch doubled until out of memory, best throughput", ""]
    lines += table11_lines(result) + [""]
    lines += [
        f"![decode tok/s against batch size]({stem(result)}_tokps.png)",
        f"![peak memory against batch size]({stem(result)}_memory.png)",
        "",
    ]
    for budget in budget_labels(result):
        if all(r["stop"].startswith("skipped") for r in budget_rows(result, budget).values()):
            continue
        heading = "Batch sweep, whole card" if budget == "whole card" else f"Under the {budget} budget"
        lines += [f"## {heading}", ""]
        metrics = METRICS if budget == "whole card" else METRICS[:2] + METRICS[4:5]
        for title, value, digits in metrics:
            lines += [f"### {title}", ""] + metric_table(result, budget, value, digits) + [""]
    if result.get("hf_generate"):
        attention = f", attention implementation {result['hf_attention']}" if result.get("hf_attention") else ""
        lines += [f"## Hugging Face `generate` (same shape, dense{attention})", ""] + hf_lines(result) + [""]
    return "\n".join(lines)


def plot_caption(result: dict) -> str:
    c = result["conditions"]
    memory = f"{c['device_memory_bytes'] / GIB:.0f} GiB card" if c.get("device_memory_bytes") else "no GPU"
    v = c["versions"]
    text = (
        f"{c['device']} ({memory}, whole card), {c['dtype']}, random weights; prompt {c['prompt']}, "
        f"{c['new_tokens']} new tokens, greedy decode in CUDA graphs"
        + (f", {c['products']} products" if c.get("products") else "")
        + (f", allocator {c['allocator']}" if c.get("allocator") else "")
        + f"; torch {v['torch']}, triton {v['triton']}; "
        f"{c['date']}" + (" — QUICK SMOKE TEST" if c.get("quick") else "")
    )
    return "\n".join(textwrap.wrap(text, 110))


def render_plots(result: dict, out_dir: Path) -> list[Path]:
    """Decode tok/s and peak memory against batch size (whole card), one line per variant;
    nothing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return []
    records = budget_rows(result, "whole card")
    shape = result["conditions"]["shape"]
    written = []
    for suffix, title, ylabel, value in (
        (
            "tokps",
            f"{shape}: decode throughput against batch size",
            "decode tokens/s (log scale)",
            lambda r: r["decode_tok_s"],
        ),
        (
            "memory",
            f"{shape}: peak GPU memory against batch size",
            "peak allocated GiB (weights included)",
            lambda r: r["peak_allocated_bytes"] / GIB if r.get("peak_allocated_bytes") is not None else None,
        ),
    ):
        fig, ax = plt.subplots(figsize=(9, 6))
        batches = set()
        for label, record in records.items():
            points = [(row["batch"], value(row)) for row in record["rows"] if value(row) is not None]
            if points:
                oom = record.get("out_of_memory_at")
                ax.plot(*zip(*points), marker="o", label=label if oom is None else f"{label} (out of memory at {oom})")
                batches |= {b for b, _ in points}
        if suffix == "tokps":
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        else:
            card = result["conditions"].get("device_memory_bytes")
            if card:
                ax.axhline(card / GIB, color="grey", linestyle="--", linewidth=1, label="card memory")
        ax.set_xscale("log", base=2)
        if batches:
            ax.set_xticks(sorted(batches), [str(b) for b in sorted(batches)])
        ax.set_xlabel("batch size (log2)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.suptitle(title)
        ax.set_title(plot_caption(result), fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem(result)}_{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(result: dict, out_dir: Path, plots: bool) -> list[Path]:
    base = out_dir / stem(result)
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(render_markdown(result) + "\n")
    return [json_path, md_path] + (render_plots(result, out_dir) if plots else [])


def merge_results(results: list[dict]) -> dict:
    """Runs of one shape split over several calls (by --variants or --skip-hf): one result."""
    merged = {"conditions": dict(results[0]["conditions"]), "variants": {}, "hf_generate": []}
    if len(results) > 1:
        merged["conditions"]["merged_runs"] = [r["conditions"].get("date") for r in results]
    for r in results:
        if r["conditions"]["shape"] != merged["conditions"]["shape"]:
            raise SystemExit(f"cannot merge shapes {merged['conditions']['shape']} and {r['conditions']['shape']}")
        merged["variants"] |= r["variants"]
        merged["hf_generate"] += r.get("hf_generate", [])
        if r.get("hf_attention"):
            merged["hf_attention"] = r["hf_attention"]
    return merged


def render_files(paths: list[str], out_dir: str | None) -> list[Path]:
    result = merge_results([json.loads(Path(p).read_text()) for p in paths])
    target = Path(out_dir) if out_dir else Path(paths[0]).parent
    target.mkdir(parents=True, exist_ok=True)
    written = write_outputs(result, target, plots=True)
    if not any(p.suffix == ".png" for p in written):
        print("matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
    return written
