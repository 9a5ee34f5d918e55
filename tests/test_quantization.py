"""Quantized checkpoints: the grids, GPTQ, the stored format and the runtime that reads it.

Tiny random Llama checkpoints (dense export and 25% slice, float64): every linear's codes and
scales are what the format says, the runtime's logits stay near the unquantized model's (int8
much nearer than int4), GPTQ's output error on the calibration text is below round-to-nearest's,
and a checkpoint whose codes do not fit its description is refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_support import assert_one_line_error, run_sliceserve
from tiny_models import NoTokenizerSource, calibration_batches, random_tokens, save_tiny_model, write_tiny_checkpoint

from sliceserve.checkpoint import open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.model.loader import load_model
from sliceserve.model.quant_format import QuantFormat
from sliceserve.model.quantized import dequantize, pack_nibbles, unpack_nibbles
from sliceserve.quantization.checkpoint_writer import quantize_checkpoint, relative_output_error
from sliceserve.quantization.gptq import gptq_quantize
from sliceserve.quantization.grids import round_to_nearest
from sliceserve.slicing.checkpoint_writer import export_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nibbles_pack_and_unpack_exactly():
    codes = torch.randint(0, 16, (5, 13), generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7)
    assert torch.equal(unpack_nibbles(packed, 13), codes.to(torch.uint8))
    assert int(packed[0, 0]) == int(codes[0, 0]) + 16 * int(codes[0, 1])  # even column in the low nibble


@pytest.mark.parametrize("bits", [8, 4])
def test_round_to_nearest_is_within_half_a_step(bits):
    weight = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fmt = QuantFormat(bits, 16, ("attn.q",))
    codes, scales, zeros = round_to_nearest(weight, fmt)
    assert scales.shape == (6, 3) and (zeros is None) == (bits == 8)
    stored = codes.to(torch.int8) if bits == 8 else pack_nibbles(codes)
    back = dequantize(stored, scales, None if zeros is None else zeros.to(torch.uint8), fmt, 40, torch.float64)
    step = scales.repeat_interleave(16, dim=1)[:, :40]
    assert torch.all((weight - back).abs() <= step / 2 + 1e-12)
    assert codes.min() >= (-127 if bits == 8 else 0) and codes.max() <= (127 if bits == 8 else 15)


@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(48, 48, dtype=torch.float64, generator=generator)
    x = torch.randn(600, 48, dtype=torch.float64, generator=generator) @ mixing  # correlated inputs
    gram = x.T @ x
    weight = torch.randn(20, 48, dtype=torch.float64, generator=generator)
    fmt = QuantFormat(bits, 16, ("attn.q",))
    errors = {}
    for name, (codes, scales, zeros) in {
        "rtn": round_to_nearest(weight, fmt),
        "gptq": gptq_quantize(weight, gram, fmt),
    }.items():
        stored = codes.to(torch.int8) if bits == 8 else pack_nibbles(codes)
        back = dequantize(stored, scales, None if zeros is None else zeros.to(torch.uint8), fmt, 48, torch.float64)
        errors[name] = relative_output_error(weight, back, gram)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    work = tmp_path_factory.mktemp("quantize")
    save_tiny_model("llama", work / "hf")
    return work, {
        kind: write_tiny_checkpoint(work / "hf", kind, work / kind, torch.float64) for kind in ("dense", "sliced")
    }


def logits_error(path, quantized) -> float:
    tokens = random_tokens(2, 24, seed=5)
    reference, got = load_model(path)(tokens), load_model(quantized)(tokens)
    return float((got - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("kind", ["dense", "sliced"])
def test_quantized_checkpoints_serve_near_the_original(checkpoints, kind):
    work, paths = checkpoints
    errors, sizes = {}, {}
    for bits, method in ((8, "rtn"), (4, "rtn"), (4, "gptq")):
        out = quantize_checkpoint(
            paths[kind], work / f"{kind}-{bits}-{method}", bits=bits, group_size=16, method=method,
            batches=calibration_batches(seed=3), shortcuts=method == "gptq", progress=False,
        )  # fmt: skip
        opened = open_checkpoint(out)  # the description and the stored codes agree
        entry = opened.config["quantization"]
        assert (
            entry["bits"] == bits and entry["method"] == method and "auto_map" in opened.config
        )  # Transformers loads it
        assert opened.tensor("layers.0.attn.q.qweight").dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert not opened.has("layers.0.attn.q.weight") and opened.has("embed.weight")
        if kind == "sliced":  # shortcuts float, or quantized where asked
            assert opened.has("layers.0.attn_shortcut") == (method != "gptq")
            assert opened.has("layers.0.mlp_shortcut.qweight") == (method == "gptq")
        errors[bits, method] = logits_error(paths[kind], out)
        sizes[bits, method] = opened.total_bytes
    # max |logit error| / max |logit| on this random model (std 0.15 weights, groups of 16): measured
    # 0.034 (int8), 0.47 (int4 RTN), 0.31 (int4 GPTQ) on the dense export
    assert errors[8, "rtn"] < 0.06 and errors[4, "rtn"] < 0.7, errors
    assert errors[8, "rtn"] < errors[4, "rtn"] / 4 and errors[4, "gptq"] < errors[4, "rtn"], errors
    assert sizes[4, "rtn"] < sizes[8, "rtn"] < open_checkpoint(paths[kind]).total_bytes


def test_gptq_records_lower_calibration_error_than_rtn(checkpoints):
    work, paths = checkpoints
    recorded = {}
    for method in ("rtn", "gptq"):
        out = work / f"sliced-4-{method}"
        if not out.exists():
            quantize_checkpoint(
                paths["sliced"], out, bits=4, group_size=16, method=method, batches=calibration_batches(seed=3),
                progress=False,
            )  # fmt: skip
        recorded[method] = json.loads((out / "config.json").read_text())["quantization"]
    assert recorded["gptq"]["relative_error"]["measure"].startswith("output error on the calibration tokens")
    assert recorded["gptq"]["calibration_tokens"] > 0
    first = recorded["gptq"]["relative_error"]["layers"][0]
    linears = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
    assert set(first) == linears | {"attn_shortcut", "mlp_shortcut"}  # the GPTQ run quantized the shortcuts too
    assert all(0 < error < 0.5 for error in first.values())


def test_codes_that_do_not_fit_the_description_are_refused(checkpoints, tmp_path):
    work, paths = checkpoints
    out = quantize_checkpoint(paths["dense"], tmp_path / "q", bits=8, group_size=16, progress=False)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["bits"] = 4  # int8 codes described as 4-bit ones
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SliceserveError, match="lacks the tensor layers.0.attn.q.zeros"):
        open_checkpoint(out)
    config["quantization"]["bits"], config["quantization"]["group_size"] = 8, 8  # twice the scales there are
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SliceserveError, match=r"scales has shape \[\d+, \d+\]; the model description needs"):
        open_checkpoint(out)
    config["quantization"]["group_size"] = 16
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SliceserveError, match="quantized already"):
        quantize_checkpoint(out, tmp_path / "again", bits=8)


def test_gptq_without_calibration_and_bad_options_are_refused(checkpoints, tmp_path):
    work, paths = checkpoints
    with pytest.raises(SliceserveError, match="calibration"):
        quantize_checkpoint(paths["dense"], tmp_path / "x", bits=4, method="gptq")
    with pytest.raises(SliceserveError, match='"bits" must be 8 or 4'):
        quantize_checkpoint(paths["dense"], tmp_path / "y", bits=3)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("variant,rotation", [("llama", "orthogonal"), ("opt", "orthogonal"), ("phi", "orthogonal"),
                                              ("llama", "hadamard"), ("phi", "hadamard")])  # fmt: skip
def test_a_rotated_checkpoint_is_the_same_model(variant, rotation, tmp_path):
    """Random orthogonal or randomized Hadamard bases folded into every weight (float64): the
    logits do not move, dense or sliced, sequential or parallel blocks, rope or learned positions."""
    from sliceserve.quantization.rotation import rotate_checkpoint

    save_tiny_model(variant, tmp_path / "hf")
    tokens = random_tokens(2, 20, seed=9)
    for kind in ("dense", "sliced"):
        path = write_tiny_checkpoint(tmp_path / "hf", kind, tmp_path / kind, torch.float64)
        rotated = rotate_checkpoint(path, tmp_path / f"{kind}-rotated", seed=1, kind=rotation)
        before, after = load_model(path)(tokens), load_model(rotated)(tokens)
        assert float((after - before).abs().max() / before.abs().max()) < 1e-10, kind
        original = open_checkpoint(path).tensor("layers.0.attn.q.weight")
        assert not torch.allclose(open_checkpoint(rotated).tensor("layers.0.attn.q.weight"), original)


def test_rotated_quantization_records_its_rotation(checkpoints, tmp_path):
    work, paths = checkpoints
    for rotation, words in (("orthogonal", "random orthogonal"), ("hadamard", "randomized Hadamard")):
        out = quantize_checkpoint(
            paths["sliced"], tmp_path / rotation, bits=4, group_size=16, rotate=rotation, seed=3, progress=False
        )
        entry = open_checkpoint(out).config["quantization"]
        assert entry["rotation"]["seed"] == 3 and "rotation" not in open_checkpoint(out).config
        assert entry["rotation"]["kind"].startswith(words)
        assert logits_error(paths["sliced"], out) < 0.7


def test_the_quantize_command(tmp_path):
    from server_support import build_checkpoint, training_words

    checkpoint = build_checkpoint(tmp_path / "ck")  # a tiny sliced model with a tokenizer
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(training_words(400)))
    out = tmp_path / "q"
    result = run_sliceserve(
        "quantize", checkpoint, "--bits", "4", "--group-size", "16", "--method", "gptq", "--rotate", "--shortcuts",
        "--calibration", text, "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--out", out, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    entry = open_checkpoint(out).config["quantization"]
    assert (entry["bits"], entry["method"], entry["calibration_tokens"]) == (4, "gptq", 128)
    assert "attn_shortcut" in entry["linears"] and entry["rotation"]["seed"] == 0
    assert load_model(out)(torch.tensor([[5, 6, 7]])).isfinite().all()
    refused = run_sliceserve(
        "quantize", checkpoint, "--bits", "4", "--group-size", "1", "--out", tmp_path / "x", cwd=tmp_path
    )
    assert_one_line_error(refused, "--group-size must be at least 2")
    assert not (tmp_path / "x").exists()
    both = run_sliceserve(
        "quantize", checkpoint, "--bits", "4", "--rotate", "--hadamard", "--out", tmp_path / "x", cwd=tmp_path
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert not (tmp_path / "x").exists()
    taken = run_sliceserve("quantize", checkpoint, "--bits", "8", "--out", out, cwd=tmp_path)
    assert_one_line_error(taken, "exists")


def test_hadamard_refuses_a_width_without_a_matrix_before_any_work(tmp_path):
    """A dense model of width 184 (no construction reaches it): refused with the nearest widths
    that have one, and nothing is written."""
    from tiny_models import tiny_config, tiny_model

    config = tiny_config("llama")
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 184, 4, 2  # heads of 46
    config.head_dim = 46
    tiny_model(config).save_pretrained(tmp_path / "hf")
    dense = export_checkpoint(NoTokenizerSource(tmp_path / "hf"), tmp_path / "dense", progress=False)
    with pytest.raises(SliceserveError, match=r"no Hadamard matrix of order 184 .*\(176 or 180\)"):
        quantize_checkpoint(dense, tmp_path / "q", bits=4, group_size=16, rotate="hadamard", progress=False)
    assert not (tmp_path / "q").exists()
