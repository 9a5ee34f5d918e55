"""Every family end to end: a tiny Transformers model through the real slicing pipeline.

For each family variant a float64 model with perturbed norms and biases is saved as a
Hugging Face folder, then read back by ``FolderSource``, sliced or exported, loaded by
the runtime and compared with Transformers' own float64 forward:

- sparsity 0 (full rotation, shortcuts) and the dense export reproduce the logits to 1e-9;
- a 25% slice has the expected width at every point and exactly the expected parameters;
- a model whose residual stream has rank 56 is sliced to 56 without any loss at all;
- padding in the calibration batches is ignored.

Refusals (post-norm OPT, projected OPT embeddings, unsupported architectures) and the
choice of adapter from the config rather than the folder name are tested at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import (
    INTERMEDIATE,
    MAX_POSITIONS,
    VARIANTS,
    VOCAB,
    WIDTH,
    NoTokenizerSource,
    calibration_batches,
    confine_stream,
    float64_reference,
    max_relative_error,
    random_tokens,
    save_tiny_model,
    tiny_config,
    tiny_model,
)
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, OPTConfig

from sliceserve.checkpoint import open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.model.loader import load_model
from sliceserve.model.spec import BIAS_NAMES, DecoderSpec, parameter_count
from sliceserve.slicing.checkpoint_writer import export_checkpoint, slice_checkpoint
from sliceserve.slicing.families import family_for
from sliceserve.slicing.sources import FolderSource

TOLERANCE = 1e-9  # max |runtime - reference| / max |reference|, float64 throughout
TEST_LENGTH = 24  # longer than Mistral's window of 8

# The width a 25% slice keeps: int(0.75 * 80) = 60, rounded down to a multiple of 8.
QUARTER_WIDTH = int(0.75 * WIDTH) // 8 * 8
assert QUARTER_WIDTH == 56

# What each variant's checkpoint is expected to hold, from what we know of the family
# (not from the code under test). LayerNorm families gain reader biases where the norm's
# bias folds in: q, k, v, the MLP input and the head.
FAMILY_FACTS = {
    "llama": dict(family="llama", gated=True, parallel=False, positions=False, biases=set()),
    "llama-biases": dict(
        family="llama", gated=True, parallel=False, positions=False, biases={"q", "k", "v", "o", "gate", "up", "down"}
    ),
    "llama3": dict(family="llama", gated=True, parallel=False, positions=False, biases=set()),
    "mistral": dict(family="mistral", gated=True, parallel=False, positions=False, biases=set()),
    "qwen2": dict(family="qwen2", gated=True, parallel=False, positions=False, biases={"q", "k", "v"}),
    "opt": dict(
        family="opt", gated=False, parallel=False, positions=True, biases={"q", "k", "v", "o", "up", "down", "head"}
    ),
    "phi": dict(
        family="phi", gated=False, parallel=True, positions=False, biases={"q", "k", "v", "o", "up", "down", "head"}
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class TinyModel:
    variant: str
    folder: Path
    model: torch.nn.Module
    tokens: torch.Tensor
    reference: torch.Tensor  # Transformers' float64 logits for `tokens`
    work: Path  # where this variant's checkpoints go

    @property
    def config(self):
        return self.model.config

    def source(self) -> FolderSource:
        return NoTokenizerSource(self.folder)


def reference_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with pytest.MonkeyPatch.context() as monkeypatch, torch.no_grad():
        float64_reference(monkeypatch)
        return model(tokens).logits


def runtime_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(checkpoint)(tokens)


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request, tmp_path_factory) -> TinyModel:
    work = tmp_path_factory.mktemp(request.param)
    model = save_tiny_model(request.param, work / "hf")
    tokens = random_tokens(3, TEST_LENGTH, seed=99)
    return TinyModel(request.param, work / "hf", model, tokens, reference_logits(model, tokens), work)


@pytest.fixture(scope="module")
def quarter(tiny) -> Path:
    """The 25% slice of the variant (shared by the tests that inspect it)."""
    return slice_checkpoint(
        tiny.source(), tiny.work / "quarter", calibration_batches(), sparsity=0.25, dtype=torch.float64, progress=False
    )


def checkpoint_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    checkpoint = open_checkpoint(path)
    shapes = {}
    for name in checkpoint.names:
        with safe_open(str(path / checkpoint.weight_map[name]), framework="pt") as shard:
            shapes[name] = tuple(shard.get_slice(name).get_shape())
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def biases_in(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """Canonical bias names present in layer 0 (and the head)."""
    found = {k for k in BIAS_NAMES if f"layers.0.attn.{k}.bias" in shapes or f"layers.0.mlp.{k}.bias" in shapes}
    return found | ({"head"} if "head.bias" in shapes else set())


def expected_parameters(variant: str, config, width: int, sliced: bool) -> int:
    """Parameters of a checkpoint whose every point has `width`, counted from the config."""
    facts = FAMILY_FACTS[variant]
    biases = facts["biases"]
    head_dim = getattr(config, "head_dim", None) or WIDTH // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    inter = INTERMEDIATE
    layer = (q_out + 2 * kv_out) * width  # q, k, v read the stream
    layer += q_out * width  # o writes it
    layer += (2 if facts["gated"] else 1) * inter * width + inter * width  # MLP in and out
    layer += ("q" in biases) * q_out + ("k" in biases) * kv_out + ("v" in biases) * kv_out
    layer += ("o" in biases) * width + ("down" in biases) * width
    layer += ("up" in biases) * inter + ("gate" in biases) * inter
    if sliced:
        layer += (1 if facts["parallel"] else 2) * width * width  # shortcut matrices
    total = config.num_hidden_layers * layer
    total += VOCAB * width  # embedding
    total += facts["positions"] * MAX_POSITIONS * width  # OPT's learned positions (offset rows dropped)
    total += VOCAB * width + ("head" in biases) * VOCAB  # head, untied
    return total


def check_widths(spec: dict, variant: str, width: int, num_layers: int) -> None:
    parallel = FAMILY_FACTS[variant]["parallel"]
    assert spec["original_width"] == WIDTH
    assert spec["embedding_width"] == width and spec["head_width"] == width
    assert len(spec["layers"]) == num_layers
    for layer in spec["layers"]:
        middle = None if parallel else width
        assert layer == {"input_width": width, "middle_width": middle, "output_width": width}


# --- exactness against Transformers ------------------------------------------------------


def test_reference_is_float64_and_nontrivial(tiny):
    """Guard the reference itself: float64 logits through SDPA, and perturbed norm weights."""
    assert tiny.reference.dtype == torch.float64
    assert tiny.model.config._attn_implementation == "sdpa"  # eager softmax runs in float32
    assert torch.isfinite(tiny.reference).all()
    norms = [p for n, p in tiny.model.named_parameters() if "norm" in n and n.endswith(".weight")]
    assert norms and all((p - 1).abs().max() > 0.1 for p in norms)


def test_sparsity_zero_reproduces_transformers(tiny):
    out = slice_checkpoint(
        tiny.source(), tiny.work / "zero", calibration_batches(), sparsity=0.0, dtype=torch.float64, progress=False
    )
    spec = open_checkpoint(out).config["model"]
    assert spec["family"] == FAMILY_FACTS[tiny.variant]["family"]
    assert spec["has_shortcuts"]
    check_widths(spec, tiny.variant, WIDTH, tiny.config.num_hidden_layers)
    assert max_relative_error(runtime_logits(out, tiny.tokens), tiny.reference) < TOLERANCE


def test_dense_export_reproduces_transformers(tiny):
    out = export_checkpoint(tiny.source(), tiny.work / "dense", dtype=torch.float64, progress=False)
    shapes = checkpoint_tensor_shapes(out)
    spec = open_checkpoint(out).config["model"]
    assert not spec["has_shortcuts"] and not any("shortcut" in name for name in shapes)
    check_widths(spec, tiny.variant, WIDTH, tiny.config.num_hidden_layers)
    assert sum(map(numel, shapes.values())) == expected_parameters(tiny.variant, tiny.config, WIDTH, sliced=False)
    assert max_relative_error(runtime_logits(out, tiny.tokens), tiny.reference) < TOLERANCE


def test_sliding_window_matters_for_mistral():
    """The Mistral case only tests the window if the window changes the logits."""
    model = tiny_model(tiny_config("mistral"))
    window = model.config.sliding_window
    assert window < TEST_LENGTH
    tokens = random_tokens(3, TEST_LENGTH, seed=99)
    windowed = reference_logits(model, tokens)
    model.config.sliding_window = None
    unwindowed = reference_logits(model, tokens)
    assert torch.equal(unwindowed[:, :window], windowed[:, :window])
    assert (unwindowed[:, window:] - windowed[:, window:]).abs().max() > 0.1


# --- the 25% slice --------------------------------------------------------------------------


def test_quarter_slice_runs(tiny, quarter):
    logits = runtime_logits(quarter, tiny.tokens)
    assert logits.shape == (3, TEST_LENGTH, VOCAB)
    assert logits.dtype == torch.float64
    assert torch.isfinite(logits).all()


def test_quarter_slice_widths(tiny, quarter):
    checkpoint = open_checkpoint(quarter)
    spec = checkpoint.config["model"]
    assert spec["has_shortcuts"]
    check_widths(spec, tiny.variant, QUARTER_WIDTH, tiny.config.num_hidden_layers)
    assert checkpoint.config["slicing"]["sparsity"] == 0.25
    shapes = checkpoint_tensor_shapes(quarter)
    assert shapes["embed.weight"] == (VOCAB, QUARTER_WIDTH)
    assert shapes["head.weight"] == (VOCAB, QUARTER_WIDTH)
    for i in range(tiny.config.num_hidden_layers):
        shortcuts = ["shortcut"] if FAMILY_FACTS[tiny.variant]["parallel"] else ["attn_shortcut", "mlp_shortcut"]
        for name in shortcuts:
            assert shapes[f"layers.{i}.{name}"] == (QUARTER_WIDTH, QUARTER_WIDTH)
        assert shapes[f"layers.{i}.attn.q.weight"][1] == QUARTER_WIDTH
        assert shapes[f"layers.{i}.attn.o.weight"][0] == QUARTER_WIDTH
        assert shapes[f"layers.{i}.mlp.down.weight"] == (QUARTER_WIDTH, INTERMEDIATE)


def test_quarter_slice_parameter_count(tiny, quarter):
    shapes = checkpoint_tensor_shapes(quarter)
    in_checkpoint = sum(map(numel, shapes.values()))
    assert biases_in(shapes) == FAMILY_FACTS[tiny.variant]["biases"]
    spec = DecoderSpec.from_dict(open_checkpoint(quarter).config["model"])
    has_biases = {k: k in biases_in(shapes) for k in BIAS_NAMES}
    assert in_checkpoint == parameter_count(spec, has_biases=has_biases)
    assert in_checkpoint == expected_parameters(tiny.variant, tiny.config, QUARTER_WIDTH, sliced=True)
    # and the runtime holds exactly those tensors (the rope table is computed, not stored)
    model = load_model(quarter)
    held = sum(p.numel() for p in model.parameters())
    held += sum(b.numel() for name, b in model.named_buffers() if not name.endswith("inv_freq"))
    assert held == in_checkpoint


# --- exact slicing of a low-rank stream, and padding --------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_rank_56_stream_is_sliced_exactly(variant, tmp_path, monkeypatch):
    """When everything writing the stream writes into a 56-dimensional subspace, PCA finds
    it at every point and the 25% slice (56 kept) must reproduce the logits: this checks
    the sliced path (rotations, shortcuts, original-width norms) to rounding error."""
    model = tiny_model(tiny_config(variant), seed=5)
    confine_stream(model, QUARTER_WIDTH)
    model.save_pretrained(tmp_path / "hf")
    tokens = random_tokens(3, TEST_LENGTH, seed=7)
    out = slice_checkpoint(
        NoTokenizerSource(tmp_path / "hf"),
        tmp_path / "sliced",
        calibration_batches(),
        sparsity=0.25,
        dtype=torch.float64,
        progress=False,
    )
    check_widths(open_checkpoint(out).config["model"], variant, QUARTER_WIDTH, model.config.num_hidden_layers)
    float64_reference(monkeypatch)
    with torch.no_grad():
        reference = model(tokens).logits
    assert max_relative_error(runtime_logits(out, tokens), reference) < TOLERANCE


def test_padding_tokens_do_not_change_the_slice(tiny, quarter):
    """Re-slice with different token ids under the mask: the checkpoint must not change."""
    other = slice_checkpoint(
        tiny.source(),
        tiny.work / "other-padding",
        calibration_batches(pad_token=VOCAB - 1),
        sparsity=0.25,
        dtype=torch.float64,
        progress=False,
    )
    batches = calibration_batches()
    assert not batches[-1][1].all()  # the padded batch is there
    first, second = open_checkpoint(quarter), open_checkpoint(other)
    assert first.names == second.names
    assert first.config["slicing"]["calibration_tokens"] == int(sum(int(m.sum()) for _, m in batches))
    for name in first.names:
        assert torch.equal(first.tensor(name), second.tensor(name)), name


# --- refusals and adapter choice -------------------------------------------------------------


def tiny_opt(**overrides) -> OPTConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
        do_layer_norm_before=True,
    )
    return OPTConfig(**{**settings, **overrides})


REFUSED = {
    "opt-post-norm": (lambda: tiny_opt(do_layer_norm_before=False), "do_layer_norm_before=False"),
    "opt-projected-embeddings": (lambda: tiny_opt(word_embed_proj_dim=16), "word_embed_proj_dim"),
    "gpt2": (
        lambda: GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        ),
        "unsupported model type 'gpt2'",
    ),
    "gemma2": (
        lambda: Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        ),
        "sandwich norms",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_models(case, tmp_path):
    make_config, reason = REFUSED[case]
    with pytest.raises(SliceserveError, match=reason):
        family_for(make_config())
    AutoModelForCausalLM.from_config(make_config()).save_pretrained(tmp_path / case)
    with pytest.raises(SliceserveError, match=reason):
        FolderSource(tmp_path / case)


def test_adapter_comes_from_the_config_not_the_folder_name(tmp_path, monkeypatch):
    folder = tmp_path / "my-opt-model"
    model = save_tiny_model("llama", folder)
    source = NoTokenizerSource(folder)
    assert source.family.name == "llama"
    out = slice_checkpoint(
        source, tmp_path / "sliced", calibration_batches(), sparsity=0.0, dtype=torch.float64, progress=False
    )
    config = open_checkpoint(out).config
    assert config["model"]["family"] == "llama" and config["source"]["model_type"] == "llama"
    tokens = random_tokens(2, TEST_LENGTH, seed=3)
    float64_reference(monkeypatch)
    with torch.no_grad():
        reference = model(tokens).logits
    assert max_relative_error(runtime_logits(out, tokens), reference) < TOLERANCE
