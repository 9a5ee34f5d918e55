"""Load a checkpoint folder into the runtime model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sliceserve.checkpoint import checkpoint_spec, is_checkpoint, open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.model.decoder import Transformer
from sliceserve.model.quant_format import quant_format
from sliceserve.model.quantized import dequantize, in_features_of


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True
) -> Transformer:
    """The runtime model of a checkpoint, its weights on `device` (in `dtype` if given)."""
    checkpoint = open_checkpoint(path, verify=verify)
    spec = checkpoint_spec(checkpoint.config)
    quantized = quant_format(checkpoint.config)

    def get(name: str) -> torch.Tensor | None:
        stem = name.removesuffix(".weight")
        if quantized is not None and not checkpoint.has(name) and checkpoint.has(f"{stem}.qweight"):
            scales = checkpoint.tensor(f"{stem}.scales", device)
            zeros = checkpoint.tensor(f"{stem}.zeros", device) if checkpoint.has(f"{stem}.zeros") else None
            codes = checkpoint.tensor(f"{stem}.qweight", device)
            in_features = in_features_of(spec, stem)
            return dequantize(codes, scales, zeros, quantized, in_features, dtype or scales.dtype)
        if not checkpoint.has(name):
            return None
        tensor = checkpoint.tensor(name, device)
        return tensor if dtype is None else tensor.to(dtype)

    return Transformer(spec, get).eval()


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer, PretrainedConfig

    # Our config.json names the modelling code the checkpoint carries (auto_map); a tokenizer needs
    # none of it, so Transformers gets a plain config rather than a question whether to run that code.
    config = PretrainedConfig() if is_checkpoint(path) else None
    try:
        return AutoTokenizer.from_pretrained(Path(path), config=config)
    except Exception as error:
        raise SliceserveError(f"{path} has no usable tokenizer: {error}") from None
