"""A model's canonical widths from its config.json alone: no weights are read.

A Hugging Face config goes through the same family adapter as the slicer
(`slicing.families`), so the planner prices exactly the tensors a checkpoint would hold;
one of our checkpoints' config.json already carries its widths. The sliced shape at a
sparsity is the one our slicer writes: every point kept at `kept_width`, shortcut matrices
in every layer, and an untied head reading the sliced width.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sliceserve.errors import SliceserveError
from sliceserve.model.spec import BIAS_NAMES, DecoderSpec, LayerWidths
from sliceserve.slicing.families import Family, decoder_spec, family_for
from sliceserve.slicing.slicer import kept_width


@dataclass
class ModelShape:
    name: str  # what the plan calls the model
    spec: DecoderSpec  # dense for a Hugging Face config; as written for a checkpoint
    biases: dict[str, bool]  # canonical bias name -> present
    dtype: str | None  # a checkpoint's weights dtype, None for a Hugging Face config


def read_model_shape(path: str | Path) -> ModelShape:
    """The shape described by a config.json (a file, or a folder holding one)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise SliceserveError(f"config not found: {path} (give a config.json or a folder holding one)")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SliceserveError(f"cannot read {file}: {error}") from None
    if not isinstance(data, dict):
        raise SliceserveError(f"{file} does not hold a JSON object")
    name = file.parent.name if file.name == "config.json" else file.stem
    if data.get("format") == "sliceserve":
        return checkpoint_shape(name, data, file.parent)
    config = hf_config(data)
    family = family_for(config)
    return ModelShape(name, decoder_spec(family, config), hf_bias_flags(family, config), None)


def hf_config(data: dict) -> Any:
    """A Transformers config object (its class fills the defaults a config.json leaves out)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in data.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(data.get("model_type"), **fields)
    except (ValueError, KeyError, TypeError):  # unknown to Transformers: family_for says what is wrong
        return SimpleNamespace(**data)


def hf_bias_flags(family: Family, config: Any) -> dict[str, bool]:
    """Which biases the checkpoint of this config would hold, after norm fusion."""
    flags = dict.fromkeys(BIAS_NAMES, False)
    if family.layer_norm:  # the norms' biases fold into every reader and into the head
        flags.update(q=True, k=True, v=True, up=True, head=True)
        linear_bias = getattr(config, "enable_bias", True)  # Phi's linears always have biases
        flags.update(o=linear_bias, down=linear_bias)
        return flags
    if family.name == "qwen2":
        flags.update(q=True, k=True, v=True)
    if getattr(config, "attention_bias", False):
        flags.update(q=True, k=True, v=True, o=True)
    if getattr(config, "mlp_bias", False):
        flags.update(gate=True, up=True, down=True)
    return flags


def checkpoint_shape(name: str, config: dict, folder: Path) -> ModelShape:
    from sliceserve.checkpoint import checkpoint_spec

    spec = checkpoint_spec(config)
    return ModelShape(name, spec, checkpoint_bias_flags(folder), config.get("dtype"))


def checkpoint_bias_flags(folder: Path) -> dict[str, bool]:
    """Biases named in the checkpoint's index, when it sits beside the config."""
    index = folder / "model.safetensors.index.json"
    names: list[str] = []
    if index.is_file():
        try:
            names = list(json.loads(index.read_text()).get("weight_map", {}))
        except (OSError, json.JSONDecodeError, AttributeError):
            names = []
    present = {name.removesuffix(".bias").rsplit(".", 1)[-1] for name in names if name.endswith(".bias")}
    return {bias: bias in present for bias in BIAS_NAMES}


def dense_spec(spec: DecoderSpec) -> DecoderSpec:
    """The same model at full width, without shortcuts."""
    dense = copy.deepcopy(spec)
    dense.dense_widths()
    dense.has_shortcuts = False
    return dense


def sliced_spec(spec: DecoderSpec, sparsity: float, round_to: int = 8) -> DecoderSpec:
    """The widths our slicer writes at `sparsity`: the same kept width at every point."""
    width = kept_width(spec.original_width, sparsity, round_to)
    sliced = copy.deepcopy(spec)
    sliced.layers = [LayerWidths(width, None if spec.parallel_block else width, width) for _ in range(spec.num_layers)]
    sliced.embedding_width = sliced.head_width = width
    sliced.has_shortcuts = True
    return sliced
