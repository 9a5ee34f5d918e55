"""Runtime models of real shapes (Llama-2-7B/13B/70B) with random weights, built on the GPU.

Benchmarks time kernels and decoding, which do not depend on the weights' values, only on
their shapes; random weights of the right shapes need no download and build in seconds.
A sliced variant has the widths our slicer writes at that sparsity (uniform, rounded to
8) and random shortcut matrices.
"""

from __future__ import annotations

import torch

from sliceserve.decoder_spec import DecoderSpec, LayerWidths, RopeSpec
from sliceserve.runtime.model import Transformer
from sliceserve.slicing.slicer import kept_width

SHAPES = {
    "llama-2-7b": dict(width=4096, layers=32, heads=32, kv_heads=32, intermediate=11008),
    "llama-2-13b": dict(width=5120, layers=40, heads=40, kv_heads=40, intermediate=13824),
    "llama-2-70b": dict(width=8192, layers=80, heads=64, kv_heads=8, intermediate=28672),
    "tiny": dict(width=256, layers=2, heads=4, kv_heads=2, intermediate=512),
}


def llama_spec(shape: str, sparsity: float = 0.0, layers: int | None = None) -> DecoderSpec:
    s = SHAPES[shape]
    spec = DecoderSpec(
        family="llama", vocab_size=32000, original_width=s["width"], num_layers=layers or s["layers"],
        num_heads=s["heads"], num_kv_heads=s["kv_heads"], head_dim=s["width"] // s["heads"],
        intermediate_size=s["intermediate"], activation="silu", gated_mlp=True, parallel_block=False,
        norm_eps=1e-5, max_positions=4096, rope=RopeSpec(theta=10000.0, rotary_dim=s["width"] // s["heads"]),
    )
    kept = kept_width(s["width"], sparsity, 8)
    spec.layers = [LayerWidths(kept, kept, kept) for _ in range(spec.num_layers)]
    spec.embedding_width = spec.head_width = kept
    spec.has_shortcuts = sparsity > 0
    return spec


def weight_shapes(spec: DecoderSpec) -> dict[str, tuple[int, ...]]:
    hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {"embed.weight": (spec.vocab_size, spec.embedding_width), "head.weight": (spec.vocab_size, spec.head_width)}
    for i, w in enumerate(spec.layers):
        p = f"layers.{i}"
        shapes |= {f"{p}.attn.q.weight": (hq, w.input_width), f"{p}.attn.k.weight": (hkv, w.input_width),
                   f"{p}.attn.v.weight": (hkv, w.input_width), f"{p}.attn.o.weight": (w.middle_width, hq),
                   f"{p}.mlp.gate.weight": (spec.intermediate_size, w.middle_width),
                   f"{p}.mlp.up.weight": (spec.intermediate_size, w.middle_width),
                   f"{p}.mlp.down.weight": (w.output_width, spec.intermediate_size)}
        if spec.has_shortcuts:
            shapes |= {f"{p}.attn_shortcut": (w.middle_width, w.input_width),
                       f"{p}.mlp_shortcut": (w.output_width, w.middle_width)}
    return shapes


def random_transformer(spec: DecoderSpec, *, dtype: torch.dtype, device: str = "cuda", seed: int = 0,
                       rounded_through: torch.dtype | None = None) -> Transformer:
    """Weights ~ N(0, 1/fan_in) (embeddings N(0, 1)), generated on `device`. With
    `rounded_through`, the same weights as a model of that dtype, held in `dtype`: a float32
    twin of a half-precision model, to tell its arithmetic's error from its weights'."""
    shapes = weight_shapes(spec)
    generator = torch.Generator(device=device).manual_seed(seed)

    def get(name: str) -> torch.Tensor | None:
        if name not in shapes:
            return None
        return random_weight(name, shapes[name], generator, dtype, rounded_through)

    return Transformer(spec, get).eval()


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
                  rounded_through: torch.dtype | None = None) -> torch.Tensor:
    """N(0, 1/fan_in), embeddings N(0, 1); drawn in float32 on the generator's device."""
    scale = 1.0 if name == "embed.weight" else shape[1] ** -0.5
    weight = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32) * scale
    return weight.to(rounded_through or dtype).to(dtype)


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads from weights: every matrix except the embedding table."""
    total = sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if not name.startswith("embed"))
    total += sum(b.numel() * b.element_size() for block in model.layers for b in block.buffers() if b is not None)
    return total


DECODER_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


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
        for name in DECODER_LINEARS:
            part, projection = name.split(".")
            linear = getattr(getattr(block, part), projection, None)  # ungated MLPs have no gate
            if linear is not None:
                linear.weight.copy_(two_four_by_magnitude(linear.weight))


def random_stage(spec: DecoderSpec, layers: range, *, dtype: torch.dtype, device: str | torch.device,
                 seed: int = 0) -> Transformer:
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
