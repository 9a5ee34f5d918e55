"""From a model source to a checkpoint whose decoder linears carry an N:M sparsity pattern.

The checkpoint is the dense export's (same tensor names, fused norms, no rotation, no
shortcuts) with the pruned zeros in the weights, and a "sparsity" entry in config.json that
tells the runtime (and `sliceserve info`) the pattern. Embeddings and the head stay dense.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sliceserve.checkpoint import CheckpointWriter
from sliceserve.errors import SliceserveError
from sliceserve.hf_modeling import loadable_by_transformers
from sliceserve.pruning.magnitude import magnitude_prune, relative_weight_change
from sliceserve.pruning.pattern import PRUNED_LINEARS, NMPattern, check_method, check_pattern_fits
from sliceserve.pruning.sparsegpt import BLOCK_COLUMNS, DAMPING
from sliceserve.pruning.stream import SparseGPTStream
from sliceserve.slicing.checkpoint_writer import checkpoint_config, compute_dtype_for
from sliceserve.slicing.families import decoder_spec
from sliceserve.slicing.fusion import Tensors, fused_embeddings, fused_head, fused_layer
from sliceserve.slicing.slicer import Batches
from sliceserve.slicing.sources import ModelSource

log = logging.getLogger(__name__)

ERROR_MEASURES = {
    "sparsegpt": "output error on the calibration tokens, ||X W^T - X W_pruned^T||_F / ||X W^T||_F",
    "magnitude": "weight change, ||W - W_pruned||_F / ||W||_F (no calibration data)",
}


def magnitude_prune_layer(tensors: Tensors, pattern: NMPattern) -> dict[str, float]:
    """Prune every linear of a layer in place; returns each one's relative weight change."""
    errors = {}
    for name in PRUNED_LINEARS:
        if f"{name}.weight" in tensors:
            weight = tensors[f"{name}.weight"]
            tensors[f"{name}.weight"] = magnitude_prune(weight, pattern)
            errors[name] = relative_weight_change(weight, tensors[f"{name}.weight"])
    return errors


def prune_checkpoint(
    source: ModelSource,
    out: str | Path,
    batches: Batches | None,
    *,
    pattern: NMPattern,
    method: str,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    calibration: dict | None = None,
    compute_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prune `source` to `pattern` with `method` and write the checkpoint folder `out`.

    SparseGPT needs the calibration `batches`; magnitude ignores them.
    """
    check_method(method)
    family, dev = source.family, torch.device(device)
    spec = decoder_spec(family, source.config)
    check_pattern_fits(spec, pattern)
    if method == "sparsegpt" and not batches:
        raise SliceserveError("SparseGPT needs calibration text (no calibration batches given)")
    dtype = dtype or source.dtype
    compute_dtype = compute_dtype or compute_dtype_for(dtype)
    started = time.perf_counter()
    with CheckpointWriter(out, dtype=dtype, overwrite=overwrite) as writer:
        embeddings = fused_embeddings(source, family, dev, torch.float64)
        stream = None
        if method == "sparsegpt":
            stream = SparseGPTStream(spec, embeddings, batches, pattern, dev, compute_dtype)
        for name, t in embeddings.items():
            writer.add(name, t)
        del embeddings

        layer_errors = []
        bar = tqdm(
            range(spec.num_layers), desc=f"pruning layers {pattern} ({method})", unit="layer", disable=not progress
        )
        for index in bar:
            tensors = fused_layer(source, family, index, dev, torch.float64)
            errors = stream.prune_layer(tensors) if stream else magnitude_prune_layer(tensors, pattern)
            for name, t in tensors.items():
                writer.add(f"layers.{index}.{name}", t)
            layer_errors.append({name: round(e, 6) for name, e in errors.items()})
            bar.set_postfix(max_error=f"{max(errors.values()):.4f}")
            log.info(
                "layer %d: relative %s: %s",
                index,
                ERROR_MEASURES[method].split(",")[0],
                ", ".join(f"{name} {e:.4f}" for name, e in errors.items()),
            )

        for name, t in fused_head(source, family, dev, torch.float64).items():
            writer.add(name, t)
        config = checkpoint_config(spec, dtype, source, None)
        config["sparsity"] = {
            "pattern": str(pattern),
            "method": method,
            "pruned": [name for name in PRUNED_LINEARS if name in layer_errors[0]],
            "calibration": calibration if stream else None,
            "calibration_tokens": stream.tokens if stream else 0,
            "block_columns": BLOCK_COLUMNS if stream else None,
            "damping": DAMPING if stream else None,
            "relative_error": {"measure": ERROR_MEASURES[method], "layers": layer_errors},
            "seconds": round(time.perf_counter() - started, 2),
            "device": device,
            "compute_dtype": str(compute_dtype).removeprefix("torch.") if stream else None,
        }
        return writer.finish(loadable_by_transformers(writer, config), source.tokenizer())
