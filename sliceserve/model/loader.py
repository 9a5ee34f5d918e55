"""Load a checkpoint folder into the runtime model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sliceserve.checkpoint import checkpoint_spec, is_checkpoint, open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.model.decoder import Transformer
from sliceserve.model.quant_format import quant_format
from sliceserve.model.quantized import QuantizedWeight
from sliceserve.model.spec_checks import expected_tensors

QUANTIZED_WEIGHTS = ("auto", "dequantize", "both", "codes")


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    quantized_weights: str = "auto",
) -> Transformer:
    """The runtime model of a checkpoint, its weights on `device` (in `dtype` if given).

    A quantized checkpoint's linears are dequantized into the model's float weights, which
    the reference model multiplies. `quantized_weights` says what else is kept:
    "dequantize": nothing; "both": also the codes, as `QuantizedWeight`s in each block's
    `quantized_weights` (by linear name: "attn.q", "mlp_shortcut"), which the fast path
    multiplies instead; "codes": the codes only, the float weights left on the meta device
    (a model for the fast path alone, without the float copy in memory); "auto": "both" on a
    CUDA device, where the fast path runs, "dequantize" elsewhere.
    """
    if quantized_weights not in QUANTIZED_WEIGHTS:
        raise SliceserveError(f"quantized_weights must be one of {', '.join(QUANTIZED_WEIGHTS)}")
    if quantized_weights == "auto":
        quantized_weights = "both" if torch.device(device).type == "cuda" else "dequantize"
    checkpoint = open_checkpoint(path, verify=verify)
    spec = checkpoint_spec(checkpoint.config)
    quantized = quant_format(checkpoint.config)
    # a quantized linear's codes are packed: its input width comes from the description
    shapes = expected_tensors(spec)[0] if quantized is not None else {}
    kept: dict[str, QuantizedWeight] = {}

    def get(name: str) -> torch.Tensor | None:
        stem = name.removesuffix(".weight")
        if quantized is not None and not checkpoint.has(name) and checkpoint.has(f"{stem}.qweight"):
            zeros = checkpoint.tensor(f"{stem}.zeros", device) if checkpoint.has(f"{stem}.zeros") else None
            weight = QuantizedWeight(
                codes=checkpoint.tensor(f"{stem}.qweight", device),
                scales=checkpoint.tensor(f"{stem}.scales", device),
                zeros=zeros,
                bits=quantized.bits,
                group_size=quantized.group_size,
                in_features=shapes[name][1],
            )
            if quantized_weights != "dequantize":
                kept[stem] = weight
            float_dtype = dtype or weight.scales.dtype
            if quantized_weights == "codes":
                return torch.empty(weight.shape, dtype=float_dtype, device="meta")
            return weight.dequantize(float_dtype)
        if not checkpoint.has(name):
            return None
        tensor = checkpoint.tensor(name, device)
        return tensor if dtype is None else tensor.to(dtype)

    model = Transformer(spec, get).eval()
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        block.quantized_weights = {k.removeprefix(prefix): w for k, w in kept.items() if k.startswith(prefix)}
    return model


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer, PretrainedConfig

    # Our config.json names the modelling code the checkpoint carries (auto_map); a tokenizer needs
    # none of it, so Transformers gets a plain config rather than a question whether to run that code.
    config = PretrainedConfig() if is_checkpoint(path) else None
    try:
        return AutoTokenizer.from_pretrained(Path(path), config=config)
    except Exception as error:
        raise SliceserveError(f"{path} has no usable tokenizer: {error}") from None
