"""The modelling code that makes our checkpoints loadable by Hugging Face Transformers.

``configuration_sliceserve.py`` and ``modeling_sliceserve.py`` are plain files that import
only torch and Transformers. Every checkpoint writer copies them into its folder and adds the
config.json keys that point Transformers at them, so that
``AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)`` works where
sliceserve is not installed. The weights need no second copy: our shard index is already
named ``model.safetensors.index.json`` with a ``weight_map``, as Transformers expects, and the
modules are named as the tensors are.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CODE_FILES = ("configuration_sliceserve.py", "modeling_sliceserve.py")
AUTO_MAP = {
    "AutoConfig": "configuration_sliceserve.SliceserveConfig",
    "AutoModel": "modeling_sliceserve.SliceserveModel",
    "AutoModelForCausalLM": "modeling_sliceserve.SliceserveForCausalLM",
}


def linear_biases(tensor_names: Iterable[str]) -> list[str]:
    """The linears that carry a bias, by their name within a layer ("attn.q", "mlp.down") or "head"."""
    found = set()
    for name in tensor_names:
        if not name.endswith(".bias"):
            continue
        linear = name.removesuffix(".bias")
        found.add(linear.split(".", 2)[2] if linear.startswith("layers.") else linear)
    return sorted(found)


def transformers_keys(tensor_names: Iterable[str]) -> dict[str, Any]:
    """The config.json keys through which Transformers finds and builds the model."""
    return {
        "model_type": "sliceserve",
        "architectures": ["SliceserveForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "linear_biases": linear_biases(tensor_names),
    }


def copy_modeling_code(folder: str | Path) -> None:
    here = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, Path(folder) / name)


def loadable_by_transformers(writer: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Copy the modelling code into a CheckpointWriter's folder (before it finishes, so the code
    arrives atomically with the weights) and return `config` with the keys that point to it."""
    copy_modeling_code(writer.staging_dir)
    return {**config, **transformers_keys(writer.tensor_names)}
