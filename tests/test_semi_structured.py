"""2:4 weights on sparse tensor cores: the pattern check (everywhere) and the fast path's
semi-structured layers against the reference path (on a GPU only: cuSPARSELt needs one)."""

from __future__ import annotations

import pytest
import torch
from kernel_support import ON_GPU, relative_error  # sets TRITON_INTERPRET first

from sliceserve.errors import SliceserveError
from sliceserve.fast.semi_structured import check_two_four
from sliceserve.model.decoder import Transformer
from sliceserve.model.spec import DecoderSpec, RopeSpec


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the two largest |w| of every group of 4 consecutive inputs."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(weight.shape)


def test_the_pattern_check_names_the_weight():
    weight = two_four(torch.randn(8, 16))
    check_two_four("ok", weight)
    weight[3, 4:8] = 1.0
    with pytest.raises(SliceserveError, match="layers.0.mlp.up is not 2:4 sparse"):
        check_two_four("layers.0.mlp.up", weight)
    with pytest.raises(SliceserveError, match="not a multiple of 4"):
        check_two_four("w", torch.zeros(4, 6))


@pytest.mark.skipif(not ON_GPU, reason="sparse tensor cores need a CUDA GPU")
def test_semi_structured_fast_path_matches_the_reference():
    from sliceserve.fast.model import FastTransformer

    spec = DecoderSpec(
        family="llama",
        vocab_size=512,
        original_width=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=512,
        activation="silu",
        gated_mlp=True,
        parallel_block=False,
        norm_eps=1e-5,
        max_positions=256,
        rope=RopeSpec(theta=10000.0, rotary_dim=64),
    )
    spec.dense_widths()
    generator = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (512, 256), "head.weight": (512, 256)}
    for i in range(2):
        shapes |= {
            f"layers.{i}.attn.q.weight": (256, 256),
            f"layers.{i}.attn.k.weight": (128, 256),
            f"layers.{i}.attn.v.weight": (128, 256),
            f"layers.{i}.attn.o.weight": (256, 256),
            f"layers.{i}.mlp.gate.weight": (512, 256),
            f"layers.{i}.mlp.up.weight": (512, 256),
            f"layers.{i}.mlp.down.weight": (256, 512),
        }

    def get(name):
        if name not in shapes:
            return None
        weight = torch.randn(shapes[name], generator=generator) * shapes[name][1] ** -0.5
        return (weight if "embed" in name or "head" in name else two_four(weight)).to("cuda", torch.float16)

    reference = Transformer(spec, get).eval()
    fast = FastTransformer(reference, semi_structured=True)
    tokens = torch.randint(0, 512, (1, 40), device="cuda")
    with torch.inference_mode():
        expected = reference(tokens)
        assert relative_error(fast(tokens), expected) < 1e-2
        cache = fast.new_cache(slots=2, max_len=64)
        slot = torch.tensor([0], device="cuda")
        fast.forward_cached(tokens[:, :-1], torch.arange(39, device="cuda")[None], slot, cache, last_only=True)
        step = fast.forward_cached(tokens[:, -1:], torch.tensor([[39]], device="cuda"), slot, cache)  # a CUDA graph
        assert relative_error(step[0, 0], expected[0, -1]) < 1e-2
