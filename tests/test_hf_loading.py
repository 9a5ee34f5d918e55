"""Our checkpoints load in Hugging Face Transformers, with the modelling code they carry.

For tiny Llama (grouped key/value heads), Phi (parallel block, partial rotary, biases), OPT
(learned positions) and Mistral (sliding window 8, shorter than the test sequences) models,
sliced at 25% and exported dense (float32 checkpoints):

- ``AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)`` gives the logits of
  our reference runtime, ``load_model(ckpt)(tokens)``: to 1e-5 in float32 through eager and sdpa
  attention, to 1e-9 when both load the weights in float64;
- greedy ``generate`` through the KV cache equals greedy without it and our engine's greedy
  tokens, and a left-padded batch generates what each row generates alone;
- the code runs in a Python where sliceserve cannot be imported.

The 2:4 pruned and the random-weight writers carry the same code (tested at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from server_support import build_tokenizer
from tiny_models import NoTokenizerSource, max_relative_error, random_tokens, save_tiny_model, write_tiny_checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from sliceserve.checkpoint import open_checkpoint
from sliceserve.engine.engine import Engine
from sliceserve.engine.requests import SamplingParams
from sliceserve.errors import SliceserveError
from sliceserve.hf_modeling import AUTO_MAP, CODE_FILES
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.pruning.checkpoint_writer import prune_checkpoint
from sliceserve.pruning.pattern import NMPattern
from sliceserve.quantization.checkpoint_writer import quantize_checkpoint
from sliceserve.slicing.random_checkpoint import export_random_checkpoint
from sliceserve.slicing.sources import FolderSource

FLOAT32_TOLERANCE = 1e-5  # max |transformers - ours| / max |ours|
FLOAT64_TOLERANCE = 1e-9
TEST_LENGTH = 24  # longer than Mistral's window of 8
NEW_TOKENS = 20
VARIANTS = ("llama", "phi", "opt", "mistral")
KINDS = ("sliced", "dense")

pytestmark = pytest.mark.usefixtures("one_thread")


def write_checkpoint(variant: str, kind: str, work: Path) -> Path:
    save_tiny_model(variant, work / "hf")
    return write_tiny_checkpoint(work / "hf", kind, work / kind, torch.float32)


@pytest.fixture(scope="module", params=[(v, k) for v in VARIANTS for k in KINDS], ids="-".join)
def checkpoint(request, tmp_path_factory) -> Path:
    variant, kind = request.param
    return write_checkpoint(variant, kind, tmp_path_factory.mktemp(f"{variant}-{kind}"))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return random_tokens(3, TEST_LENGTH, seed=99)


def from_transformers(path: Path, **options) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **options).eval()


# ---- the folder ------------------------------------------------------------------------


def test_the_checkpoint_carries_its_code_and_stays_ours(checkpoint):
    for name in CODE_FILES:
        assert (checkpoint / name).is_file()
        assert "sliceserve" not in {
            line.split()[1].split(".")[0]
            for line in (checkpoint / name).read_text().splitlines()
            if line.startswith(("import ", "from "))
        }
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["format"] == "sliceserve" and config["model_type"] == "sliceserve"
    assert config["auto_map"] == AUTO_MAP and set(AUTO_MAP) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["architectures"] == ["SliceserveForCausalLM"]
    assert open_checkpoint(checkpoint).names  # our loader reads the same folder
    hf_config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    spec = config["model"]
    assert hf_config.model == spec
    assert (hf_config.hidden_size, hf_config.num_hidden_layers) == (spec["original_width"], spec["num_layers"])
    assert hf_config.sliding_window == spec["sliding_window"]


def test_every_stored_tensor_is_a_parameter_and_nothing_is_left_to_initialise(checkpoint):
    stored = set(open_checkpoint(checkpoint).names)
    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, output_loading_info=True)
    assert {name for name, _ in model.named_parameters()} == stored
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sliced = "sliced" in checkpoint.name
    assert any("shortcut" in name for name in stored) == sliced


# ---- the numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_logits_equal_the_reference_runtime_in_float32(checkpoint, tokens, attention):
    model = from_transformers(checkpoint, dtype=torch.float32, attn_implementation=attention)
    assert model.config._attn_implementation == attention and model.dtype == torch.float32
    with torch.no_grad():
        expected = load_model(checkpoint)(tokens)
        actual = model(tokens).logits
    assert expected.dtype == torch.float32
    assert max_relative_error(actual, expected) < FLOAT32_TOLERANCE


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_logits_equal_the_reference_runtime_in_float64(checkpoint, tokens, attention):
    model = from_transformers(checkpoint, dtype=torch.float64, attn_implementation=attention)
    with torch.no_grad():
        expected = load_model(checkpoint, dtype=torch.float64)(tokens)
        actual = model(tokens).logits
    assert actual.dtype == torch.float64
    assert max_relative_error(actual, expected) < FLOAT64_TOLERANCE


def test_the_base_model_is_the_decoder_without_its_head(checkpoint, tokens):
    full = from_transformers(checkpoint)
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert type(base).__name__ == "SliceserveModel"
    with torch.no_grad():
        hidden = base(tokens).last_hidden_state
        assert torch.equal(full.head(hidden), full(tokens).logits)


class ServingEngine:
    """Our engine on the reference runtime, one request at a time."""

    def __init__(self, path: Path):
        self.engine = Engine(load_model(path), build_tokenizer(), max_batch=1)
        self.engine.start()

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        return [t for event in self.engine.generate(prompt, params) for t in event.token_ids]

    def close(self) -> None:
        self.engine.shutdown()


def test_generate_through_the_cache_equals_generate_without_it_and_our_engine(checkpoint, tokens):
    model = from_transformers(checkpoint, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # as our engine's ignore_eos: exactly NEW_TOKENS
    prompt = tokens[:1, :5]
    # An explicit mask: Transformers would otherwise take every token equal to pad_token_id for padding.
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    cached = model.generate(prompt, **greedy)[0, 5:].tolist()
    uncached = model.generate(prompt, use_cache=False, **greedy)[0, 5:].tolist()
    engine = ServingEngine(checkpoint)
    try:
        ours = engine.greedy(prompt[0].tolist(), NEW_TOKENS)
    finally:
        engine.close()
    assert len(cached) == NEW_TOKENS
    assert cached == uncached == ours


def test_a_left_padded_batch_generates_what_each_row_generates_alone(checkpoint, tokens):
    model = from_transformers(checkpoint, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    lengths = [9, 4]
    batch = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, n in enumerate(lengths):
        batch[row, -n:], mask[row, -n:] = tokens[row, :n], 1
    together = model.generate(batch, attention_mask=mask, **greedy)[:, max(lengths) :]
    for row, n in enumerate(lengths):
        prompt = tokens[row : row + 1, :n]
        alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)[0, n:]
        assert together[row].tolist() == alone.tolist()


def test_a_device_map_places_the_blocks_through_accelerate_hooks(checkpoint, tokens, tmp_path):
    """One CPU has no second device: the last block goes to disk, loaded by accelerate's hooks
    at each call, as a block on a second GPU is reached through them."""
    spec = json.loads((checkpoint / "config.json").read_text())["model"]
    placement = {"embed": "cpu", "positions" if spec["rope"] is None else "rotary": "cpu", "head": "cpu"}
    placement |= {f"layers.{i}": "cpu" for i in range(spec["num_layers"] - 1)} | {
        f"layers.{spec['num_layers'] - 1}": "disk"
    }
    model = from_transformers(checkpoint, device_map=placement, offload_folder=tmp_path, dtype=torch.float32)
    assert model.hf_device_map == placement
    with torch.no_grad():
        assert max_relative_error(model(tokens).logits, load_model(checkpoint)(tokens)) < FLOAT32_TOLERANCE


def test_a_training_step_reaches_every_parameter(checkpoint, tokens):
    model = from_transformers(checkpoint)
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---- a Python without sliceserve ---------------------------------------------------------

BLOCKED_PYTHON = r"""
import sys

class NoSliceserve:
    def find_spec(self, name, path=None, target=None):
        if name == "sliceserve" or name.startswith("sliceserve."):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, NoSliceserve())
import torch
from transformers import AutoModelForCausalLM

checkpoint, tokens_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32)
with torch.no_grad():
    torch.save(model(torch.load(tokens_file)).logits, out_file)
assert not [m for m in sys.modules if m.split(".")[0] == "sliceserve"]
"""


@pytest.mark.parametrize("variant", ["phi"])
def test_the_code_runs_where_sliceserve_cannot_be_imported(variant, tmp_path, tokens):
    work = tmp_path / "work"
    original = write_checkpoint(variant, "sliced", work)
    checkpoint = shutil.copytree(original, tmp_path / "elsewhere" / "model")  # away from our tree
    torch.save(tokens, tmp_path / "tokens.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    argv = [str(checkpoint), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")]
    # -I: no PYTHONPATH, no user site, no script folder on sys.path; the blocker stops the editable install.
    result = subprocess.run(
        [sys.executable, "-I", "-c", BLOCKED_PYTHON, *argv], cwd=empty, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = load_model(original)(tokens)
    assert max_relative_error(torch.load(tmp_path / "logits.pt"), expected) < FLOAT32_TOLERANCE


# ---- the other writers -------------------------------------------------------------------


def test_a_two_four_pruned_checkpoint_loads(tmp_path, tokens):
    save_tiny_model("llama", tmp_path / "hf")
    source = NoTokenizerSource(tmp_path / "hf")
    pattern = NMPattern(2, 4)
    pruned = prune_checkpoint(source, tmp_path / "pruned", None, pattern=pattern, method="magnitude", progress=False)
    model = from_transformers(pruned, dtype=torch.float64)
    assert (model.layers[0].mlp.up.weight == 0).float().mean() == 0.5
    with torch.no_grad():
        expected = load_model(pruned, dtype=torch.float64)(tokens)
        assert max_relative_error(model(tokens).logits, expected) < FLOAT64_TOLERANCE


@pytest.mark.parametrize("sparsity", [0.0, 0.25])
def test_a_random_weight_checkpoint_loads_with_its_tokenizer(tmp_path, sparsity, monkeypatch):
    build_tokenizer().save_pretrained(tmp_path / "tokenizer")
    out = export_random_checkpoint(
        "tiny",
        tmp_path / "random",
        tokenizer_dir=tmp_path / "tokenizer",
        sparsity=sparsity,
        dtype=torch.float32,
        progress=False,
    )
    model = from_transformers(out, dtype=torch.float64)
    tokens = random_tokens(2, 12, seed=5, vocab=model.config.vocab_size)
    with torch.no_grad():
        expected = load_model(out, dtype=torch.float64)(tokens)
        assert max_relative_error(model(tokens).logits, expected) < FLOAT64_TOLERANCE
    # Our own tools never ask whether to run the code the checkpoint names, nor convert it again.
    questions = []
    monkeypatch.setattr("builtins.input", lambda *args: questions.append(args) or "n")
    assert len(load_tokenizer(out)) == len(build_tokenizer()) and not questions
    with pytest.raises(SliceserveError, match="is a sliceserve checkpoint"):
        FolderSource(out)
    assert not questions


@pytest.mark.parametrize(
    "variant, kind, bits, shortcuts",
    [("llama", "sliced", 4, True), ("llama", "sliced", 8, False), ("phi", "dense", 4, False)],
    ids=["llama-sliced-int4-shortcuts", "llama-sliced-int8", "phi-dense-int4"],
)
def test_a_quantized_checkpoint_loads_with_its_codes(variant, kind, bits, shortcuts, tmp_path, tokens):
    """`sliceserve quantize`'s output: its codes, scales and zero points are the model's buffers
    (nothing missing, nothing left over, nothing converted to float in the file's place), and
    the logits are our reference runtime's, which loads the same codes dequantized."""
    original = write_checkpoint(variant, kind, tmp_path)
    quantized = quantize_checkpoint(
        original, tmp_path / "quantized", bits=bits, group_size=16, shortcuts=shortcuts, progress=False
    )
    model, info = AutoModelForCausalLM.from_pretrained(
        quantized, trust_remote_code=True, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    stored = set(open_checkpoint(quantized).names)
    assert set(model.state_dict()) == stored
    layer = model.layers[0]
    assert layer.attn.q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(layer.attn.q.qweight, open_checkpoint(quantized).tensor("layers.0.attn.q.qweight"))
    assert isinstance(getattr(layer, "attn_shortcut", None), torch.nn.Module) == shortcuts
    with torch.no_grad():
        expected = load_model(quantized)(tokens)
        assert max_relative_error(model.eval()(tokens).logits, expected) < FLOAT32_TOLERANCE
        # and the codes are what the model computes with: the unquantized checkpoint differs
        assert max_relative_error(load_model(original)(tokens), expected) > 10 * FLOAT32_TOLERANCE
