"""`sliceserve ppl` and `sliceserve info`."""

from __future__ import annotations

import argparse
import json
import math

import torch

from sliceserve.checkpoint import checkpoint_spec, open_checkpoint
from sliceserve.commands.slicing import check_device
from sliceserve.errors import SliceserveError
from sliceserve.harness.scorer import open_scoring_model
from sliceserve.perplexity import evaluation_tokens, perplexity
from sliceserve.slicing.calibration import read_text_files, wikitext2_text
from sliceserve.slicing.checkpoint_writer import DTYPES


def model_for_perplexity(args: argparse.Namespace):
    """(logits function, tokenizer, max positions) for a checkpoint (its reference model) or a
    source model (run by Transformers itself)."""
    dtype = DTYPES[args.dtype] if args.dtype else None
    model = open_scoring_model(args.path, device=args.device, dtype=dtype, runtime="reference")
    return model.logits, model.tokenizer, model.max_positions


@torch.inference_mode()
def ppl_command(args: argparse.Namespace) -> int:
    check_device(args.device)
    if args.batch_size < 1:
        raise SliceserveError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.data == "wikitext2":
        text = wikitext2_text("test", args.data_dir)  # find the data before loading the model
    else:
        text = read_text_files([p.strip() for p in args.data.split(",") if p.strip()])
    logits_fn, tokenizer, max_positions = model_for_perplexity(args)
    if args.seqlen > max_positions:
        raise SliceserveError(f"--seqlen {args.seqlen} exceeds the model's {max_positions} positions")
    tokens = evaluation_tokens(tokenizer, text)
    result = perplexity(logits_fn, tokens, seqlen=args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size)
    print(
        f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens in {result['windows']} windows of {args.seqlen}"
    )
    if args.json:
        print(json.dumps(result))
    return 0


def checkpoint_summary(path: str) -> dict:
    from safetensors import safe_open

    checkpoint = open_checkpoint(path, verify=True)
    spec = checkpoint_spec(checkpoint.config)
    parameters = 0
    for shard in sorted(set(checkpoint.weight_map.values())):
        with safe_open(str(checkpoint.path / shard), framework="pt") as handle:
            for name in handle.keys():
                parameters += math.prod(handle.get_slice(name).get_shape())
    config = checkpoint.config
    return {
        "path": str(checkpoint.path),
        "family": spec.family,
        "sliced": spec.has_shortcuts,
        "original_width": spec.original_width,
        "embedding_width": spec.embedding_width,
        "layer_widths": [[w.input_width, w.middle_width, w.output_width] for w in spec.layers],
        "head_width": spec.head_width,
        "layers": spec.num_layers,
        "parameters": parameters,
        "bytes": checkpoint.total_bytes,
        "dtype": config.get("dtype"),
        "source": config.get("source"),
        "slicing": config.get("slicing"),
        "sparsity": config.get("sparsity"),
        "versions": config.get("versions"),
        "created": config.get("created"),
    }


def info_command(args: argparse.Namespace) -> int:
    summary = checkpoint_summary(args.path)
    if args.json:
        print(json.dumps(summary))
        return 0
    slicing = summary["slicing"] or {}
    widths = sorted({w for layer in summary["layer_widths"] for w in layer if w is not None})
    print(f"checkpoint   {summary['path']}")
    print(f"family       {summary['family']}, {summary['layers']} layers, {summary['dtype']}")
    sparsity = summary["sparsity"] or {}
    print(
        f"kind         {'sliced' if summary['sliced'] else 'dense'}"
        + (f" at sparsity {slicing.get('sparsity')}" if slicing else "")
        + (f", {sparsity['pattern']} sparse ({sparsity['method']})" if sparsity else "")
    )
    print(
        f"widths       original {summary['original_width']}, kept {', '.join(map(str, widths))}"
        f" (embedding {summary['embedding_width']}, head {summary['head_width']})"
    )
    print(f"parameters   {summary['parameters']:,}")
    print(f"bytes        {summary['bytes']:,}")
    print(f"source       {summary['source']['model']}")
    if slicing:
        cal = slicing.get("calibration", {})
        print(
            f"calibration  {cal.get('source')}, {cal.get('nsamples')} x {cal.get('seqlen')}, seed {cal.get('seed')}"
            f"; {slicing.get('calibration_tokens')} tokens; sliced in {slicing.get('seconds')} s on {slicing.get('device')}"
        )
        explained = slicing.get("explained_variance", {})
        outputs = [layer["output"] for layer in explained.get("layers", [])]
        if outputs:
            print(
                f"explained    variance kept at layer outputs: min {min(outputs):.4f}, mean {sum(outputs) / len(outputs):.4f}"
            )
    for line in sparsity_lines(sparsity) if sparsity else []:
        print(line)
    print(f"versions     {summary['versions']}")
    return 0


def sparsity_lines(sparsity: dict) -> list[str]:
    """What `info` says of an N:M pruned checkpoint: pattern, method, linears, calibration, error."""
    lines = [
        f"sparsity     {sparsity['pattern']} ({sparsity['method']}) in {', '.join(sparsity.get('pruned', []))}"
        f" of every layer; embeddings and head dense"
    ]
    cal = sparsity.get("calibration")
    if cal:
        lines.append(
            f"calibration  {cal.get('source')}, {cal.get('nsamples')} x {cal.get('seqlen')}, seed {cal.get('seed')}"
            f"; {sparsity.get('calibration_tokens')} tokens; pruned in {sparsity.get('seconds')} s"
            f" on {sparsity.get('device')}"
        )
    layers = sparsity.get("relative_error", {}).get("layers", [])
    errors = [e for layer in layers for e in layer.values()]
    if errors:
        measure = sparsity["relative_error"]["measure"].split(",")[0]
        lines.append(f"error        relative {measure}: mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}")
    return lines
