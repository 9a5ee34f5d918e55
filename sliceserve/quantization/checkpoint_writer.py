"""A checkpoint of ours (dense export, sliced or 2:4) with its block linears quantized.

The linears' weights become codes and scales (model/quantized.py), and with `shortcuts` a
sliced block's shortcut matrices too (by round-to-nearest: GPTQ's statistics are gathered at
the linears); every other tensor (the embedding, the head, biases) is copied as it is. RTN
needs no data; GPTQ runs the calibration text through the checkpoint's own runtime model
(stream.py), held in float64. Each linear's relative output error on the calibration tokens,
||X W^T - X Q^T||_F / ||X W^T||_F, goes into config.json beside the scheme (GPTQ; RTN records
its relative weight change).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sliceserve.checkpoint import CheckpointWriter, checkpoint_spec, open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.hf_modeling import loadable_by_transformers
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.model.quant_format import SHORTCUTS, QuantFormat, quant_format
from sliceserve.model.quantized import dequantize, pack_nibbles
from sliceserve.model.spec import BLOCK_LINEARS
from sliceserve.quantization.gptq import DAMPING, gptq_quantize
from sliceserve.quantization.grids import round_to_nearest
from sliceserve.quantization.rotation import ROTATIONS, rotate_checkpoint
from sliceserve.quantization.stream import QuantizationStream, block_linears
from sliceserve.slicing.slicer import Batches

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
TRANSFORMERS_KEYS = ("model_type", "architectures", "auto_map", "linear_biases")  # written anew with the code


def stored_name(layer: int, name: str) -> str:
    """The tensor a block matrix is in the unquantized checkpoint."""
    return f"layers.{layer}.{name}" if name in SHORTCUTS else f"layers.{layer}.{name}.weight"


def stored(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: QuantFormat) -> dict:
    """The tensors a quantized linear is written as."""
    if fmt.bits == 8:
        return {"qweight": codes.to(torch.int8), "scales": scales}
    return {"qweight": pack_nibbles(codes), "scales": scales, "zeros": zeros.to(torch.uint8)}


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W - Q)^T||_F / ||X W^T||_F from H = X^T X alone."""
    delta = (weight - quantized).to(torch.float64)
    w = weight.to(torch.float64)
    return float(torch.sqrt(torch.einsum("oi,ij,oj->", delta, gram, delta) / torch.einsum("oi,ij,oj->", w, gram, w)))


def quantize_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    bits: int,
    group_size: int = 128,
    method: str = "rtn",
    batches: Batches | None = None,
    calibration: dict | None = None,
    shortcuts: bool = False,
    rotate: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Quantize checkpoint `path` into `out`. With `rotate` ("orthogonal" or "hadamard"), its
    stream is first rotated by such matrices (rotation.py, from `seed`) into a temporary
    checkpoint: the same model, whose weights quantize with less error."""
    if quant_format(open_checkpoint(path, verify=False).config) is not None:
        raise SliceserveError(f"{path} is quantized already")
    with contextlib.ExitStack() as stack:
        reading = path
        if rotate:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="sliceserve-rotated-"))
            reading = rotate_checkpoint(path, Path(folder) / "rotated", seed, kind=rotate)
        return write_quantized(
            path, reading, out, bits=bits, group_size=group_size, method=method, batches=batches,
            calibration=calibration, shortcuts=shortcuts, overwrite=overwrite, progress=progress,
            rotation={"kind": ROTATIONS[rotate][1], "seed": seed} if rotate else None,
        )  # fmt: skip


def write_quantized(
    path: str | Path,
    reading: str | Path,
    out: str | Path,
    *,
    bits: int,
    group_size: int,
    method: str,
    batches: Batches | None,
    calibration: dict | None,
    shortcuts: bool,
    overwrite: bool,
    progress: bool,
    rotation: dict | None,
) -> Path:
    """quantize_checkpoint's work: the tensors of `reading` (`path`, or its rotated copy)."""
    if method not in METHODS:
        raise SliceserveError(f"unknown quantization method {method!r}: rtn or gptq")
    if method == "gptq" and not batches:
        raise SliceserveError("GPTQ needs calibration text (no calibration batches given)")
    source = open_checkpoint(reading)
    if quant_format(source.config) is not None:
        raise SliceserveError(f"{path} is quantized already")
    spec = checkpoint_spec(source.config)
    linears = BLOCK_LINEARS + (tuple(name for name in SHORTCUTS if source.has(f"layers.0.{name}")) if shortcuts else ())
    fmt = QuantFormat.from_config({"bits": bits, "group_size": group_size, "linears": list(linears)}, "the options")
    dtype = source.tensor("embed.weight").dtype
    started = time.perf_counter()
    model = load_model(reading, dtype=torch.float64) if method == "gptq" else None
    stream = QuantizationStream(model, batches) if model is not None else None
    quantized_names = {stored_name(i, name) for i in range(spec.num_layers) for name in linears}
    with CheckpointWriter(out, dtype=dtype, overwrite=overwrite) as writer:
        for name in source.names:
            if name not in quantized_names:
                writer.add(name, source.tensor(name))
        errors = []
        bar = tqdm(
            range(spec.num_layers), desc=f"quantizing to {bits} bits ({method})", unit="layer", disable=not progress
        )
        for i in bar:
            grams = stream.grams(i, linears) if stream is not None else {}
            modules = block_linears(model.layers[i], linears) if model is not None else {}
            layer_errors = {}
            for name in linears:
                key = stored_name(i, name)
                if not source.has(key):
                    continue
                weight = source.tensor(key).to(torch.float64)
                if name in grams:
                    codes, scales, zeros = gptq_quantize(weight, grams[name].gram, fmt)
                else:
                    codes, scales, zeros = round_to_nearest(weight, fmt)
                for suffix, tensor in stored(codes, scales, zeros, fmt).items():
                    writer.add(f"{key.removesuffix('.weight')}.{suffix}", tensor)
                tensors = stored(codes, scales.to(dtype), zeros, fmt)  # as the runtime will read them back
                back = dequantize(
                    tensors["qweight"], tensors["scales"], tensors.get("zeros"), fmt, weight.shape[1], torch.float64
                )
                if name in grams:
                    layer_errors[name] = relative_output_error(weight, back, grams[name].gram)
                    modules[name].weight.data.copy_(back)  # the stream moves on through the quantized layer
                else:
                    layer_errors[name] = float((weight - back).norm() / weight.norm())
                    if model is not None and name in SHORTCUTS:
                        getattr(model.layers[i], name).copy_(back)
            if stream is not None:
                stream.advance(i)
            errors.append({name: round(e, 6) for name, e in layer_errors.items()})
            bar.set_postfix(max_error=f"{max(layer_errors.values()):.4f}")
        config = {key: value for key, value in source.config.items() if key not in TRANSFORMERS_KEYS}
        config.pop("format", None), config.pop("format_version", None), config.pop("rotation", None)
        config["quantization"] = {
            "bits": bits,
            "group_size": group_size,
            "linears": list(linears),
            "method": method,
            "scheme": "symmetric int8, w = q * scale" if bits == 8 else "asymmetric 4-bit, w = (q - zero) * scale",
            "calibration": calibration if stream is not None else None,
            "calibration_tokens": stream.tokens if stream is not None else 0,
            "damping": DAMPING if stream is not None else None,
            "relative_error": {
                "measure": "output error on the calibration tokens (shortcuts: weight change)"
                if stream is not None
                else "weight change",
                "layers": errors,
            },
            "rotation": rotation,
            "seconds": round(time.perf_counter() - started, 2),
            "source": str(Path(path).resolve()),
        }
        try:
            tokenizer = load_tokenizer(path)
        except SliceserveError:
            tokenizer = None
        return writer.finish(loadable_by_transformers(writer, config), tokenizer)
