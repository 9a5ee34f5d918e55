"""Which layers each device of a running pipeline holds: the planner's arithmetic applied
to a checkpoint and to the serving settings (slots, positions per slot)."""

from __future__ import annotations

from pathlib import Path

from sliceserve.errors import SliceserveError
from sliceserve.planning.memory import DEFAULT_STEP_TOKENS, DTYPE_BYTES, Workload, stage_costs
from sliceserve.planning.model_shape import read_model_shape
from sliceserve.planning.planner import balanced_stages, fewest_stages
from sliceserve.planning.sizes import format_size


def serving_workload(
    dtype: str | None, *, max_batch: int, max_model_len: int, step_tokens: int | None = None
) -> Workload:
    return Workload(
        dtype=dtype if dtype in DTYPE_BYTES else "float16",
        batch=max_batch,
        context=max_model_len,
        step_tokens=step_tokens or DEFAULT_STEP_TOKENS,
    )


def checkpoint_stage_ranges(
    path: str | Path,
    count: int,
    *,
    max_batch: int,
    max_model_len: int,
    budget: int | None = None,
    step_tokens: int | None = None,
) -> list[range]:
    """`count` contiguous layer ranges balanced by bytes (weights, KV cache, activations of
    steps of `step_tokens`, the server's token budget); with a per-device `budget`, a
    SliceserveError when a stage would not fit in it."""
    shape = read_model_shape(path)
    context = min(max_model_len, shape.spec.max_positions)
    work = serving_workload(shape.dtype, max_batch=max_batch, max_model_len=context, step_tokens=step_tokens)
    costs = stage_costs(shape.spec, shape.biases, work)
    stages = balanced_stages(costs, count)
    largest = max(stages, key=lambda s: s.total)
    if budget is not None and largest.total > budget:
        needed = len(fewest_stages(costs, budget))
        raise SliceserveError(
            f"{count} device(s) of {format_size(budget)} are too few: the largest stage needs "
            f"{format_size(largest.total)} at --max-batch {max_batch} and --max-model-len {context}; "
            f"the plan needs {needed} (see `sliceserve plan`)"
        )
    return [stage.layers for stage in stages]
