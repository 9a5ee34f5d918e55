"""The fast path serves a quantized checkpoint from its codes and computes the reference model
(which multiplies the dequantized weights).

A tiny random Llama with every bias, float32: dense export and 25% slice, each quantized to
int8 (groups of 32, shortcuts kept float) and to 4 bits (groups of 64, shortcuts quantized
too). The fast model is loaded with the codes only (its float weights never made), so every
decoder product it runs reads codes: a batched prefill of more rows than the decode tiles
(dequantized per product, library products), then decode steps of three rows at different
lengths (the quantized kernels). Measured relative errors of the logits against the
reference on the CPU interpreter: 6.0e-7 to 7.4e-7 (prefill), 5.2e-7 to 1.4e-6 (decode).
"""

from __future__ import annotations

import pytest
import torch
from kernel_support import DEVICE, relative_error  # sets TRITON_INTERPRET first
from tiny_models import random_tokens, save_tiny_model, write_tiny_checkpoint

from sliceserve.fast.model import FastTransformer
from sliceserve.fast.quantized_weights import block_weight
from sliceserve.model.kv_cache import PrefillChunk
from sliceserve.model.loader import load_model
from sliceserve.model.quantized import QuantizedWeight
from sliceserve.quantization.checkpoint_writer import quantize_checkpoint

TOLERANCE = 1e-5  # float32 throughout; measured at most 1.4e-6
FORMATS = {8: 32, 4: 64}  # bits: group size


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory):
    work = tmp_path_factory.mktemp("quantized-fast")
    save_tiny_model("llama-biases", work / "hf")
    return work, {
        kind: write_tiny_checkpoint(work / "hf", kind, work / kind, torch.float32) for kind in ("dense", "sliced")
    }


@pytest.fixture(scope="module", params=[(kind, bits) for kind in ("dense", "sliced") for bits in FORMATS])
def models(request, float_checkpoints):
    kind, bits = request.param
    work, paths = float_checkpoints
    path = quantize_checkpoint(
        paths[kind], work / f"{kind}-{bits}", bits=bits, group_size=FORMATS[bits], method="rtn",
        shortcuts=bits == 4, progress=False,
    )  # fmt: skip
    reference = load_model(path, device=DEVICE, quantized_weights="dequantize")
    codes_only = load_model(path, device=DEVICE, quantized_weights="codes")
    return kind, bits, reference, FastTransformer(codes_only)


def test_the_fast_path_multiplies_codes(models):
    kind, bits, _, fast = models
    layer = fast.layers[0]
    weights = [layer.qkv_weight, layer.o_weight, layer.gate_weight, layer.up_weight, layer.down_weight]
    if kind == "sliced" and bits == 4:
        weights += [layer.attn_shortcut, layer.mlp_shortcut]
    assert all(isinstance(w, QuantizedWeight) and w.bits == bits for w in weights)
    if kind == "sliced" and bits == 8:  # shortcuts kept float by the checkpoint
        assert isinstance(layer.attn_shortcut, torch.Tensor) and not layer.attn_shortcut.is_meta


@torch.no_grad()
def test_prefill_then_decode_give_the_reference_logits(models):
    _, _, reference, fast = models
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (13, 5, 9)]
    slots = [2, 0, 3]
    caches = {"reference": reference.new_cache(slots=4, max_len=32), "fast": fast.new_cache(slots=4, max_len=32)}
    # One prefill of 27 rows: above the decode tiles, so dequantized weights and library products.
    expected = torch.cat(
        [
            reference.forward_cached(
                torch.tensor([p], device=DEVICE),
                torch.arange(len(p), device=DEVICE)[None],
                torch.tensor([s], device=DEVICE),
                caches["reference"],
            )[0]
            for s, p in zip(slots, prompts)
        ]
    )
    chunks = [PrefillChunk(p, 0, s, all_positions=True) for s, p in zip(slots, prompts)]
    assert relative_error(fast.prefill(chunks, caches["fast"]), expected) < TOLERANCE
    # A decode step of three rows at different lengths: the quantized kernels.
    tokens = random_tokens(3, 1, seed=7).to(DEVICE)
    positions = torch.tensor([len(p) for p in prompts], device=DEVICE)[:, None]
    slot_ids = torch.tensor(slots, device=DEVICE)
    expected = reference.forward_cached(tokens, positions, slot_ids, caches["reference"])
    actual = fast.forward_cached(tokens, positions, slot_ids, caches["fast"])
    assert relative_error(actual, expected) < TOLERANCE


def test_the_loader_keeps_codes_only_where_asked(float_checkpoints):
    """On a CPU "auto" only dequantizes (the reference path's memory as before); "both" keeps
    the float weights and the codes, and the reference model computes the same either way. A
    group size the kernels do not take runs from float weights."""
    work, _ = float_checkpoints
    path = work / "dense-8"
    tokens = random_tokens(1, 6, seed=2)
    auto, both = load_model(path), load_model(path, quantized_weights="both")
    assert not any(block.quantized_weights for block in auto.layers)
    linears = {f"attn.{p}" for p in "qkvo"} | {f"mlp.{p}" for p in ("gate", "up", "down")}
    assert set(both.layers[0].quantized_weights) == linears
    assert torch.equal(auto(tokens), both(tokens))
    odd = quantize_checkpoint(work / "dense", work / "dense-8-g24", bits=8, group_size=24, progress=False)
    block = load_model(odd, quantized_weights="codes").layers[0]
    weight = block_weight(block, "attn.q", block.attn.q.weight)
    assert isinstance(weight, torch.Tensor) and not weight.is_meta
    assert torch.equal(weight, load_model(odd).layers[0].attn.q.weight)
