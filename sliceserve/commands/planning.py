"""`sliceserve plan`: how many cards of a given size a model needs, dense and sliced."""

from __future__ import annotations

import argparse
import json

from sliceserve.errors import SliceserveError
from sliceserve.model.spec import DecoderSpec
from sliceserve.planning.memory import Workload, stage_costs
from sliceserve.planning.model_shape import ModelShape, dense_spec, read_model_shape, sliced_spec
from sliceserve.planning.planner import Stage, describe_layers, fewest_stages
from sliceserve.planning.sizes import format_size, parse_size


def plan_command(args: argparse.Namespace) -> int:
    budget = parse_size(args.gpu_memory)
    shape = read_model_shape(args.config)
    spec = shape.spec
    work = Workload(
        dtype=args.dtype or shape.dtype or "float16",
        batch=args.batch,
        context=args.context or spec.max_positions,
        step_tokens=args.max_num_batched_tokens,
        reserve=parse_size(args.reserve, allow_zero=True),
        bits=args.bits,
        group_size=args.group_size,
        quantized_shortcuts=args.quantized_shortcuts,
    )
    if args.quantized_shortcuts and args.bits is None:
        raise SliceserveError("--quantized-shortcuts needs --bits")
    if work.context > spec.max_positions:
        raise SliceserveError(f"--context {work.context} exceeds the model's {spec.max_positions} positions")
    if args.round_to < 1:
        raise SliceserveError(f"--round-to must be at least 1, got {args.round_to}")
    sliced, sparsity = sliced_variant(shape, args.sparsity, args.round_to)
    report = {
        "model": shape.name,
        "family": spec.family,
        "layers": spec.num_layers,
        "original_width": spec.original_width,
        "gpu_memory": budget,
        "workload": {
            "dtype": work.dtype,
            "batch": work.batch,
            "context": work.context,
            "prefill_chunk": work.prefill_chunk,
            "step_tokens": work.step_tokens,
            "reserve": work.reserve,
            "bits": work.bits,
            "group_size": work.group_size if work.bits else None,
            "quantized_shortcuts": work.quantized_shortcuts,
        },
        "dense": plan_report(dense_spec(spec), shape, work, budget, "dense"),
        "sliced": {"sparsity": sparsity, **plan_report(sliced, shape, work, budget, "the sliced model")},
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_plan(report)
    return 0


def sliced_variant(shape: ModelShape, sparsity: float | None, round_to: int) -> tuple[DecoderSpec, float | None]:
    """The sliced model to plan: a sliced checkpoint as it is, anything else sliced at `sparsity`."""
    if shape.spec.has_shortcuts:
        if sparsity is not None:
            raise SliceserveError("this checkpoint is already sliced: its own widths are planned, drop --sparsity")
        return shape.spec, None
    sparsity = 0.25 if sparsity is None else sparsity
    return sliced_spec(shape.spec, sparsity, round_to), sparsity


def plan_report(spec: DecoderSpec, shape: ModelShape, work: Workload, budget: int, label: str) -> dict:
    stages = fewest_stages(stage_costs(spec, shape.biases, work), budget, label)
    widths = sorted(
        {
            w
            for layer in spec.layers
            for w in (layer.input_width, layer.middle_width, layer.output_width)
            if w is not None
        }
    )
    return {
        "cards": len(stages),
        "widths": widths,
        "weights": sum(s.weights for s in stages),
        "stages": [stage_report(s) for s in stages],
    }


def stage_report(stage: Stage) -> dict:
    return {
        "layers": [stage.layers.start, stage.layers.stop - 1],
        "weights": stage.weights,
        "kv_cache": stage.kv_cache,
        "activations": stage.activations,
        "reserve": stage.reserve,
        "total": stage.total,
    }


def cards(count: int) -> str:
    return f"{count} card" if count == 1 else f"{count} cards"


def print_plan(report: dict) -> None:
    work = report["workload"]
    print(f"{report['model']}: {report['family']}, {report['layers']} layers, width {report['original_width']}")
    print(
        f"cards of {format_size(report['gpu_memory'])}; {work['dtype']}, batch {work['batch']} "
        f"(+1 scratch KV slot), context {work['context']}, prefill chunks of {work['prefill_chunk']} "
        f"in steps of {work['step_tokens']} tokens, "
        f"reserve {format_size(work['reserve'])} a card"
        + (
            f"; block linears{' and shortcuts' if work['quantized_shortcuts'] else ''} in {work['bits']} bits, "
            f"groups of {work['group_size']}"
            if work["bits"]
            else ""
        )
    )
    sliced = report["sliced"]
    kind = f"sliced {sliced['sparsity']:.0%}" if sliced["sparsity"] is not None else "sliced (checkpoint)"
    print(f"dense needs {cards(report['dense']['cards'])}, {kind} needs {sliced['cards']}")
    for name, plan in (("dense", report["dense"]), (kind, sliced)):
        widths = ", ".join(map(str, plan["widths"]))
        print(f"\n{name}: width {widths}, weights {format_size(plan['weights'])}, {cards(plan['cards'])}")
        print(f"  {'card':<5}{'layers':<14}{'weights':>12}{'KV cache':>12}{'activations':>13}{'total':>12}")
        last = len(plan["stages"]) - 1
        for i, stage in enumerate(plan["stages"]):
            layers = describe_layers(range(stage["layers"][0], stage["layers"][1] + 1))
            extras = ("+emb" if i == 0 else "") + ("+head" if i == last else "")
            print(
                f"  {i:<5}{layers + ' ' + extras:<14}{format_size(stage['weights']):>12}"
                f"{format_size(stage['kv_cache']):>12}{format_size(stage['activations']):>13}"
                f"{format_size(stage['total']):>12}"
            )
