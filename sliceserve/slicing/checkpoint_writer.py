"""From a model source to a finished checkpoint folder: sliced, or dense in the same format."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sliceserve
from sliceserve.checkpoint import CheckpointWriter
from sliceserve.hf_modeling import loadable_by_transformers
from sliceserve.model.spec import DecoderSpec
from sliceserve.slicing.families import decoder_spec
from sliceserve.slicing.fusion import fused_embeddings, fused_head, fused_layer
from sliceserve.slicing.slicer import Batches, Slicer
from sliceserve.slicing.sources import ModelSource

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def library_versions() -> dict:
    import transformers

    return {
        "sliceserve": sliceserve.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def checkpoint_config(spec: DecoderSpec, dtype: torch.dtype, source: ModelSource, slicing: dict | None) -> dict:
    return {
        "model": spec.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "source": {"model": source.description, "model_type": source.config.model_type},
        "slicing": slicing,
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Activations run in float64 for float64 checkpoints (exact checks), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slice_checkpoint(
    source: ModelSource,
    out: str | Path,
    batches: Batches,
    *,
    sparsity: float,
    round_to: int = 8,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    calibration: dict | None = None,
    compute_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Slice `source` with the calibration batches and write the checkpoint folder `out`.

    `compute_dtype` is the activations' dtype while slicing (PCA is float64 regardless).
    """
    dtype = dtype or source.dtype
    compute_dtype = compute_dtype or compute_dtype_for(dtype)
    with CheckpointWriter(out, dtype=dtype, overwrite=overwrite) as writer:
        slicer = Slicer(
            source,
            writer,
            sparsity=sparsity,
            round_to=round_to,
            device=torch.device(device),
            compute_dtype=compute_dtype,
            progress=progress,
        )
        result = slicer.run(batches)
        slicing = {
            "sparsity": sparsity,
            "round_to": round_to,
            "calibration": calibration or {},
            "calibration_tokens": int(sum(int(m.sum()) for _, m in batches)),
            "explained_variance": result.explained,
            "seconds": round(result.seconds, 2),
            "device": device,
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
        }
        config = loadable_by_transformers(writer, checkpoint_config(result.spec, dtype, source, slicing))
        return writer.finish(config, source.tokenizer())


def export_checkpoint(
    source: ModelSource,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the dense model (norms fused, no rotation, no shortcuts) in the checkpoint format."""
    dtype = dtype or source.dtype
    family, dev = source.family, torch.device(device)
    spec = decoder_spec(family, source.config)
    with CheckpointWriter(out, dtype=dtype, overwrite=overwrite) as writer:
        for name, t in fused_embeddings(source, family, dev, torch.float64).items():
            writer.add(name, t)
        for index in tqdm(range(spec.num_layers), desc="exporting layers", unit="layer", disable=not progress):
            for name, t in fused_layer(source, family, index, dev, torch.float64).items():
                writer.add(f"layers.{index}.{name}", t)
        for name, t in fused_head(source, family, dev, torch.float64).items():
            writer.add(name, t)
        config = loadable_by_transformers(writer, checkpoint_config(spec, dtype, source, None))
        return writer.finish(config, source.tokenizer())
