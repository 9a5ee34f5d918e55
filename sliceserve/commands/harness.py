"""`sliceserve eval`: zero-shot tasks of lm-evaluation-harness on a checkpoint, scored in this
process by our runtime (sliceserve/harness/lm.py); a markdown table, and JSON with --out."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sliceserve.commands.slicing import check_device
from sliceserve.errors import SliceserveError
from sliceserve.slicing.sources import DEMO_ALIASES

log = logging.getLogger("sliceserve")


def evaluate_tasks(
    path: str,
    tasks: list[str],
    *,
    include_path: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    runtime: str = "auto",
    batch_size: int = 8,
    max_length: int | None = None,
    limit: float | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict:
    """lm-eval's results dict for `tasks` on the model at `path`; the tasks (and their data sets)
    load before the model does."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    from sliceserve.harness.lm import SliceserveLM
    from sliceserve.harness.tasks import load_tasks

    check_device(device)
    if path not in DEMO_ALIASES and not Path(path).exists():  # before the tasks, which take a while
        raise SliceserveError(
            f"model not found: {path} (give a checkpoint, a Hugging Face folder, a .gguf file or smollm2-135m)"
        )
    if batch_size < 1:
        raise SliceserveError(f"--batch-size must be at least 1, got {batch_size}")
    manager, built = load_tasks(tasks, include_path)
    lm = SliceserveLM(path, device=device, dtype=dtype, runtime=runtime, batch_size=batch_size, max_length=max_length)
    return simple_evaluate(
        model=lm,
        tasks=built,
        task_manager=manager,
        device=device,  # recorded in results["config"]
        batch_size=batch_size,
        limit=limit,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )


def require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise SliceserveError("sliceserve eval needs lm-evaluation-harness: pip install 'sliceserve[eval]'")


def eval_command(args: argparse.Namespace) -> int:
    require_lm_eval()
    from lm_eval.utils import handle_non_serializable, make_table

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    results = evaluate_tasks(
        args.model,
        tasks,
        include_path=args.include_path,
        device=args.device,
        dtype=args.dtype,
        runtime=args.runtime,
        batch_size=args.batch_size,
        max_length=args.max_length,
        limit=limit,
        log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters,
    )
    config = results["config"]
    print(f"\n{args.model} ({config['runtime']} on {config['device']}, {config['dtype'] or 'its stored dtype'})")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        log.info(f"results written to {args.out}")
    return 0
