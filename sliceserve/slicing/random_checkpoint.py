"""Checkpoints of real shapes (Llama-2-7B/13B/70B) with random weights: `export random:SHAPE`.

Serving and decoding speed depend on the weights' shapes, not their values, so random weights
of the right shapes reproduce a GPU figure without a download or a licence. A sliced variant
has the widths our slicer writes at that sparsity (uniform, rounded down to a multiple of 8)
and random shortcut matrices. Weights are N(0, 1/fan_in), embeddings N(0, 1): activations keep
their scale through the layers, so the logits stay finite in half precision.

Tensors are drawn one at a time on the chosen device, in `weight_shapes` order, and streamed
into the checkpoint writer: a 70B shape never sits in memory whole.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sliceserve.checkpoint import CheckpointWriter, check_destination
from sliceserve.errors import SliceserveError
from sliceserve.hf_modeling import loadable_by_transformers
from sliceserve.model.loader import load_tokenizer
from sliceserve.model.spec import DecoderSpec, LayerWidths, RopeSpec
from sliceserve.model.spec_checks import expected_tensors
from sliceserve.slicing.checkpoint_writer import library_versions
from sliceserve.slicing.slicer import kept_width

RANDOM_PREFIX = "random:"  # `sliceserve export random:llama-2-7b`
ROUND_TO = 8  # the slicer's default --round-to
MAX_POSITIONS = 4096  # Llama-2's context

SHAPES = {
    "llama-2-7b": dict(width=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
    "llama-2-13b": dict(width=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
    "llama-2-70b": dict(width=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=32000),
    # for tests: a vocabulary small enough for a tokenizer trained in a second
    "tiny": dict(width=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=256),
}


def shape_sizes(shape: str) -> dict[str, int]:
    if shape not in SHAPES:
        raise SliceserveError(f"unknown random model shape {shape!r}; known: {', '.join(SHAPES)}")
    return SHAPES[shape]


def llama_spec(shape: str, sparsity: float = 0.0, layers: int | None = None) -> DecoderSpec:
    """The decoder of a named shape, every width kept as the slicer would at `sparsity`."""
    s = shape_sizes(shape)
    head_dim = s["width"] // s["heads"]
    spec = DecoderSpec(
        family="llama",
        vocab_size=s["vocab"],
        original_width=s["width"],
        num_layers=layers or s["layers"],
        num_heads=s["heads"],
        num_kv_heads=s["kv_heads"],
        head_dim=head_dim,
        intermediate_size=s["intermediate"],
        activation="silu",
        gated_mlp=True,
        parallel_block=False,
        norm_eps=1e-5,
        max_positions=MAX_POSITIONS,
        rope=RopeSpec(theta=10000.0, rotary_dim=head_dim),
    )
    kept = kept_width(s["width"], sparsity, ROUND_TO)
    spec.layers = [LayerWidths(kept, kept, kept) for _ in range(spec.num_layers)]
    spec.embedding_width = spec.head_width = kept
    spec.has_shortcuts = sparsity > 0
    return spec


def weight_shapes(spec: DecoderSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder needs (no biases), by its checkpoint name: the embedding, each
    layer's in turn, then the head (the order the random weights are drawn in)."""
    shapes, _ = expected_tensors(spec)
    head = shapes.pop("head.weight")
    return shapes | {"head.weight": head}


def random_weight(
    name: str,
    shape: tuple[int, ...],
    generator: torch.Generator,
    dtype: torch.dtype,
    rounded_through: torch.dtype | None = None,
) -> torch.Tensor:
    """N(0, 1/fan_in), embeddings N(0, 1); drawn in float32 on the generator's device. With
    `rounded_through`, rounded to that dtype first (a float32 twin of a half-precision model)."""
    scale = 1.0 if name == "embed.weight" else shape[1] ** -0.5
    weight = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32) * scale
    return weight.to(rounded_through or dtype).to(dtype)


def random_tensors(
    spec: DecoderSpec,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    seed: int = 0,
    rounded_through: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `spec`, one at a time, from one generator seeded with `seed`: the same
    seed and device give the same values, whoever consumes them (a checkpoint or a model)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape in weight_shapes(spec).items():
        yield name, random_weight(name, shape, generator, dtype, rounded_through)


def provenance(shape: str, seed: int) -> str:
    return f"random weights of {shape} shapes, seed {seed}"


def tokenizer_for(folder: str | Path | None, vocab_size: int) -> Any:
    """The saved Hugging Face tokenizer in `folder`, if it can spell every token id of the model."""
    if folder is None:
        raise SliceserveError("a random model needs --tokenizer DIR (a saved Hugging Face tokenizer folder)")
    path = Path(folder)
    if not path.is_dir():  # checked here: Transformers would take a missing folder for a Hub name
        raise SliceserveError(f"tokenizer folder not found: {path}")
    tokenizer = load_tokenizer(path)
    if len(tokenizer) < vocab_size:
        raise SliceserveError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens, fewer than the model's vocabulary of {vocab_size}"
        )
    return tokenizer


def token_id(tokenizer: Any, name: str, vocab_size: int) -> int | None:
    """The tokenizer's bos/eos/pad id, when the model can produce it (its vocabulary may be smaller)."""
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, int) and 0 <= value < vocab_size else None


def export_random_checkpoint(
    shape: str,
    out: str | Path,
    *,
    tokenizer_dir: str | Path | None,
    sparsity: float = 0.0,
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a checkpoint of the named shape with random weights and the tokenizer of `tokenizer_dir`.

    Dense at sparsity 0 (no shortcut matrices), else sliced to uniform kept widths.
    """
    spec = llama_spec(shape, sparsity)  # checks the name and the sparsity
    tokenizer = tokenizer_for(tokenizer_dir, spec.vocab_size)
    spec.bos_token_id, spec.eos_token_id, spec.pad_token_id = (
        token_id(tokenizer, f"{kind}_token_id", spec.vocab_size) for kind in ("bos", "eos", "pad")
    )
    check_destination(Path(out).absolute(), overwrite)  # before any tensor is drawn
    started = time.perf_counter()
    with CheckpointWriter(out, dtype=dtype, overwrite=overwrite) as writer:
        tensors = random_tensors(spec, dtype=dtype, device=device, seed=seed)
        total = len(weight_shapes(spec))
        for name, tensor in tqdm(tensors, total=total, desc=f"random {shape}", unit="tensor", disable=not progress):
            writer.add(name, tensor)
        config = {
            "model": spec.to_dict(),
            "dtype": str(dtype).removeprefix("torch."),
            "source": {
                "model": f"{RANDOM_PREFIX}{shape}",
                "model_type": "llama",
                "provenance": provenance(shape, seed),
            },
            "slicing": None,  # no slicer ran: the widths below are the slicer's, the values are not
            "random": {
                "shape": shape,
                "sizes": SHAPES[shape],
                "seed": seed,
                "sparsity": sparsity,
                "round_to": ROUND_TO,
                "widths": "uniform" if sparsity > 0 else "dense",
                "device": str(device),
                "distribution": "N(0, 1/fan_in); embeddings N(0, 1); shortcuts N(0, 1/fan_in)",
                "seconds": round(time.perf_counter() - started, 2),
            },
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        return writer.finish(loadable_by_transformers(writer, config), tokenizer)
