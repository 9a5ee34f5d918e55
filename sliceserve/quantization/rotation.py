"""A rotation of a checkpoint's residual stream (random orthogonal, or QuaRot's randomized
Hadamard): the same model, weights that quantize better.

Every point of the stream may be expressed in any orthonormal basis of its kept components:
with x' = x Q, a reader W (out, d) becomes W Q, a writer W (d, in) and its bias become Q^T W
and Q^T b, a shortcut S between bases b1 and b2 becomes Q_b2^T S Q_b1, the embedding E Q and
the head H Q; the weightless RMSNorm sees the same sum of squares. A dense model has one basis
throughout (its residual adds need it); a sliced one a basis at each kept width (layer inputs,
and the middles of sequential blocks). Rotated, a weight's large entries spread over all its
inputs, which is what QuaRot (arXiv 2404.00456) does with Hadamard matrices before quantizing;
here every rotation folds into the weights offline, so any orthogonal matrix serves: a Haar-random
one of any width, or a randomized Hadamard one (hadamard.py) where the width has a construction.
Computed in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from sliceserve.checkpoint import CheckpointWriter, checkpoint_spec, open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.hf_modeling import loadable_by_transformers
from sliceserve.model.loader import load_tokenizer
from sliceserve.model.spec import ATTENTION_READERS, ATTENTION_WRITER, MLP_READERS, MLP_WRITER, DecoderSpec
from sliceserve.quantization.hadamard import random_hadamard, require_hadamard_widths

TRANSFORMERS_KEYS = ("model_type", "architectures", "auto_map", "linear_biases")  # written anew with the code


def random_orthogonal(width: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed: QR of a Gaussian matrix, the signs of R's diagonal moved into Q."""
    q, r = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


# --rotate's and --hadamard's kinds: how each basis's matrix is drawn, and what config.json says of it
ROTATIONS = {
    "orthogonal": (random_orthogonal, "random orthogonal, one per basis of the stream"),
    "hadamard": (random_hadamard, "randomized Hadamard (QuaRot), one per basis of the stream"),
}


def stream_widths(spec: DecoderSpec) -> set[int]:
    """The widths of the stream's bases: layer inputs, the head's, and sequential blocks' middles."""
    widths = {w.input_width for w in spec.layers} | {spec.head_width}
    return widths if spec.parallel_block else widths | {w.middle_width for w in spec.layers}


def check_rotation(spec: DecoderSpec, kind: str) -> None:
    """Refuse, before any work, a kind that is unknown or cannot rotate one of the stream's widths."""
    if kind not in ROTATIONS:
        raise SliceserveError(f"unknown rotation {kind!r}: {' or '.join(ROTATIONS)}")
    if kind == "hadamard":
        require_hadamard_widths(stream_widths(spec))


class Bases:
    """The rotation of each basis of the stream, made on first use."""

    def __init__(self, spec: DecoderSpec, seed: int, kind: str = "orthogonal"):
        self.dense, self.generator, self.made = not spec.has_shortcuts, torch.Generator().manual_seed(seed), {}
        self.draw = ROTATIONS[kind][0]

    def get(self, key: str, width: int) -> torch.Tensor:
        key = "stream" if self.dense else key
        if key not in self.made:
            self.made[key] = self.draw(width, self.generator)
        return self.made[key]


def rotated_tensors(
    spec: DecoderSpec, get: Callable[[str], torch.Tensor | None], seed: int, kind: str = "orthogonal"
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint `get` reads, rotated (float64)."""
    check_rotation(spec, kind)
    bases, out = Bases(spec, seed, kind), {}

    def put(name: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            out[name] = tensor

    def read(name: str) -> torch.Tensor | None:
        tensor = get(name)
        return None if tensor is None else tensor.to(torch.float64)

    q_in = lambda i: bases.get(f"in{i}", spec.layers[i].input_width if i < spec.num_layers else spec.head_width)  # noqa: E731
    for name in ("embed.weight", "positions.weight"):
        tensor = read(name)
        put(name, None if tensor is None else tensor @ q_in(0))
    for i, widths in enumerate(spec.layers):
        prefix = f"layers.{i}"
        q_mid = q_in(i) if spec.parallel_block else bases.get(f"mid{i}", widths.middle_width)
        q_next = q_in(i + 1)
        attn_out = q_next if spec.parallel_block else q_mid
        mlp_in = q_in(i) if spec.parallel_block else q_mid
        for linear, basis in [*((r, q_in(i)) for r in ATTENTION_READERS), *((r, mlp_in) for r in MLP_READERS)]:
            weight = read(f"{prefix}.{linear}.weight")
            put(f"{prefix}.{linear}.weight", None if weight is None else weight @ basis)
            put(f"{prefix}.{linear}.bias", read(f"{prefix}.{linear}.bias"))
        for linear, basis in ((ATTENTION_WRITER, attn_out), (MLP_WRITER, q_next)):
            weight, bias = read(f"{prefix}.{linear}.weight"), read(f"{prefix}.{linear}.bias")
            put(f"{prefix}.{linear}.weight", basis.T @ weight)
            put(f"{prefix}.{linear}.bias", None if bias is None else basis.T @ bias)
        shortcuts = {"shortcut": (q_next, q_in(i))} if spec.parallel_block else {
            "attn_shortcut": (q_mid, q_in(i)), "mlp_shortcut": (q_next, q_mid),
        }  # fmt: skip
        for name, (to_basis, from_basis) in shortcuts.items():
            shortcut = read(f"{prefix}.{name}")
            put(f"{prefix}.{name}", None if shortcut is None else to_basis.T @ shortcut @ from_basis)
    put("head.weight", read("head.weight") @ q_in(spec.num_layers))
    put("head.bias", read("head.bias"))
    return out


def rotate_checkpoint(
    path: str | Path, out: str | Path, seed: int = 0, overwrite: bool = False, kind: str = "orthogonal"
) -> Path:
    """`path` with its stream rotated (`kind`: a key of ROTATIONS), written to `out` in the same dtype."""
    source = open_checkpoint(path)
    spec = checkpoint_spec(source.config)
    dtype = source.tensor("embed.weight").dtype
    get = lambda name: source.tensor(name) if source.has(name) else None  # noqa: E731
    tensors = rotated_tensors(spec, get, seed, kind)
    missing = set(source.names) - set(tensors)
    if missing:
        raise AssertionError(f"the rotation does not cover {sorted(missing)}")
    with CheckpointWriter(out, dtype=dtype, overwrite=overwrite) as writer:
        for name in source.names:
            writer.add(name, tensors[name])
        config = {k: v for k, v in source.config.items() if k not in TRANSFORMERS_KEYS}
        config = {**config, "rotation": {"kind": ROTATIONS[kind][1], "seed": seed}}
        try:
            tokenizer = load_tokenizer(path)
        except SliceserveError:
            tokenizer = None
        return writer.finish(loadable_by_transformers(writer, config), tokenizer)
