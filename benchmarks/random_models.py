"""Runtime models of real shapes (Llama-2-7B/13B/70B) with random weights, built on the GPU.

Benchmarks time kernels and decoding, which do not depend on the weights' values, only on
their shapes; random weights of the right shapes need no download and build in seconds.
The shapes, the widths of a sliced variant and the weights' distribution live in
`sliceserve.slicing.random_checkpoint` (which also writes them as a checkpoint to serve);
this file builds runtime models from them and prunes them.
"""

from __future__ import annotations

import torch

from sliceserve.model.decoder import Transformer
from sliceserve.model.spec import BLOCK_LINEARS, DecoderSpec
from sliceserve.slicing.random_checkpoint import SHAPES, llama_spec, random_tensors, random_weight, weight_shapes

__all__ = [
    "SHAPES",
    "hf_llama_config",
    "llama_spec",
    "weight_shapes",
    "random_weight",
    "random_transformer",
    "weight_bytes",
    "two_four_by_magnitude",
    "prune_decoder_two_four",
    "random_stage",
]


def hf_llama_config(shape: str):
    """Transformers' LlamaConfig of a SHAPES entry (vocabulary 32000, 4096 positions)."""
    import transformers

    s = SHAPES[shape]
    return transformers.LlamaConfig(
        hidden_size=s["width"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        vocab_size=32000,
        max_position_embeddings=4096,
    )


def random_transformer(
    spec: DecoderSpec,
    *,
    dtype: torch.dtype,
    device: str = "cuda",
    seed: int = 0,
    rounded_through: torch.dtype | None = None,
) -> Transformer:
    """Weights ~ N(0, 1/fan_in) (embeddings N(0, 1)), generated on `device`: the same values as
    `sliceserve export random:SHAPE` writes for that seed and device. With `rounded_through`, the
    same weights as a model of that dtype, held in `dtype`: a float32 twin of a half-precision
    model, to tell its arithmetic's error from its weights'."""
    tensors = dict(random_tensors(spec, dtype=dtype, device=device, seed=seed, rounded_through=rounded_through))
    return Transformer(spec, tensors.get).eval()


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads from weights: every matrix except the embedding table."""
    total = sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if not name.startswith("embed"))
    total += sum(b.numel() * b.element_size() for block in model.layers for b in block.buffers() if b is not None)
    return total


def two_four_by_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every group of 4 consecutive inputs (rows of an (out, in) weight)."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device).scatter_(-1, keep, True)
    return (groups * mask).reshape(weight.shape)


@torch.no_grad()
def prune_decoder_two_four(model: Transformer) -> None:
    """Magnitude 2:4 pruning, in place, of every decoder linear (embedding and head stay dense):
    the cheap stand-in for SparseGPT 2:4, whose speed is the same for the same pattern."""
    for block in model.layers:
        for name in BLOCK_LINEARS:
            part, projection = name.split(".")
            linear = getattr(getattr(block, part), projection, None)  # ungated MLPs have no gate
            if linear is not None:
                linear.weight.copy_(two_four_by_magnitude(linear.weight))


def random_stage(
    spec: DecoderSpec, layers: range, *, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> Transformer:
    """Layers `layers` of a random model, generated directly on `device` (the embedding too when
    the range starts at layer 0, the head when it ends at the last layer): a pipeline stage of a
    model too large for one device (dense Llama-2-70B is ~138 GB) is built on its own GPU, never
    whole. Same distributions as `random_transformer`; other values (a seed of its own)."""
    shapes = weight_shapes(spec)
    generator = torch.Generator(device=device).manual_seed(seed + layers.start)

    def belongs(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in layers
        return layers.start == 0 if name.startswith("embed.") else layers.stop == spec.num_layers

    def get(name: str) -> torch.Tensor | None:
        if name not in shapes or not belongs(name):
            return None
        return random_weight(name, shapes[name], generator, dtype)

    return Transformer(spec, get, layers).eval()
