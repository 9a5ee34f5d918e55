"""N:M pruning (SparseGPT and magnitude) into the checkpoint format.

- The algorithm: SparseGPT equals the naive column-by-column optimal-brain-surgeon sweep,
  and on a random layer with correlated inputs it reconstructs the layer's output better
  than magnitude pruning.
- Every family end to end: each decoder linear carries exactly the 2:4 pattern, embeddings,
  head and biases are the dense export's, the runtime loads the checkpoint; a model that
  already is 2:4 passes through SparseGPT unchanged (its logits equal the dense export's).
- The real SmolLM2-135M: SparseGPT 2:4 has a lower perplexity than magnitude 2:4.
- The command line: pruning, `info`, and one-line errors for bad input, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import assert_nothing_written, assert_one_line_error, run_sliceserve, save_tiny_llama
from tiny_models import (
    VARIANTS,
    NoTokenizerSource,
    calibration_batches,
    float64_reference,
    random_tokens,
    save_tiny_model,
    tiny_config,
    tiny_model,
)

from sliceserve.checkpoint import open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.model.loader import load_model
from sliceserve.perplexity import evaluation_tokens, perplexity
from sliceserve.pruning.checkpoint_writer import prune_checkpoint
from sliceserve.pruning.magnitude import magnitude_prune
from sliceserve.pruning.pattern import METHODS, PRUNED_LINEARS, NMPattern, nonzeros_per_group, parse_pattern
from sliceserve.pruning.sparsegpt import reconstruction_error, sparsegpt_prune
from sliceserve.slicing.calibration import load_calibration, wikitext2_text
from sliceserve.slicing.checkpoint_writer import export_checkpoint
from sliceserve.slicing.sources import open_source

TWO_FOUR = NMPattern(2, 4)


# -- the algorithm ---------------------------------------------------------------------------------


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Inputs whose features are mixed and of unequal scale, as a layer's inputs are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    scales = torch.logspace(-1, 1, width, dtype=torch.float64)[torch.randperm(width, generator=generator)]
    return torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mixing * scales


def naive_sparsegpt(weight: torch.Tensor, gram: torch.Tensor, pattern: NMPattern, damping: float = 0.01):
    """The sweep written from its definition: for each row, each group's mask from
    w_c^2 / [H_{c:}^-1]_00, then each pruned weight removed with the optimal update of the
    weights to its right, inverting the dampened H restricted to those columns every time."""
    hessian = gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    pruned = weight.clone()
    for w in pruned:
        for start in range(0, w.numel(), pattern.group):
            columns = range(start, start + pattern.group)
            saliency = torch.stack([w[c] ** 2 / torch.linalg.inv(hessian[c:, c:])[0, 0] for c in columns])
            removed = set((saliency.topk(pattern.group - pattern.kept, largest=False).indices + start).tolist())
            for c in columns:
                if c in removed:
                    inverse = torch.linalg.inv(hessian[c:, c:])
                    w[c:] -= w[c] / inverse[0, 0] * inverse[0]
                    w[c] = 0.0
    return pruned


def test_sparsegpt_equals_the_naive_sweep():
    x = correlated_inputs(300, 24, seed=0)
    weight = torch.randn(6, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # blocks of 8 columns: the lazy updates between blocks are exercised too
    fast = sparsegpt_prune(weight, x.T @ x, TWO_FOUR, block_columns=8)
    assert torch.allclose(fast, naive_sparsegpt(weight, x.T @ x, TWO_FOUR), rtol=0, atol=1e-12)
    assert (nonzeros_per_group(fast, TWO_FOUR) == 2).all()


def test_sparsegpt_reconstructs_a_layer_better_than_magnitude():
    x = correlated_inputs(2048, 256, seed=2)
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gram = x.T @ x

    def output_error(pruned: torch.Tensor) -> float:
        return float((x @ weight.T - x @ pruned.T).norm() / (x @ weight.T).norm())

    by_sparsegpt, by_magnitude = sparsegpt_prune(weight, gram, TWO_FOUR), magnitude_prune(weight, TWO_FOUR)
    for pruned in (by_sparsegpt, by_magnitude):
        assert (nonzeros_per_group(pruned, TWO_FOUR) == 2).all()
        assert reconstruction_error(weight, pruned, gram) == pytest.approx(output_error(pruned), rel=1e-9)
    # Measured: 0.122 against 0.364 (relative output error of the 2:4 layer).
    assert output_error(by_sparsegpt) < 0.5 * output_error(by_magnitude)


def test_magnitude_keeps_the_largest_of_each_group():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.25, -1.5, 0.0]])
    expected = [[0.0, -3.0, 2.0, 0.0, 0.0, 1.25, -1.5, 0.0]]
    assert magnitude_prune(weight, TWO_FOUR).tolist() == expected
    assert magnitude_prune(weight, NMPattern(1, 2)).tolist() == expected


@pytest.mark.parametrize("text", ["2:4:8", "2/4", "two:four", "", "4:2", "4:4", "0:4"])
def test_bad_patterns_are_refused(text: str):
    with pytest.raises(SliceserveError, match="--pattern"):
        parse_pattern(text)


def test_patterns_parse():
    assert parse_pattern("2:4") == TWO_FOUR and str(parse_pattern(" 1 : 8 ")) == "1:8"


# -- every family, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    for variant in VARIANTS:
        save_tiny_model(variant, folder / variant)
    return folder


@pytest.fixture(scope="module")
def dense_exports(models: Path) -> Path:
    folder = models / "dense"
    for variant in VARIANTS:
        export_checkpoint(NoTokenizerSource(models / variant), folder / variant, progress=False)
    return folder


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_linear_is_two_four_and_the_rest_dense(models, dense_exports, tmp_path, variant, method):
    out = prune_checkpoint(
        NoTokenizerSource(models / variant),
        tmp_path / "pruned",
        calibration_batches(),
        pattern=TWO_FOUR,
        method=method,
        progress=False,
    )
    pruned, dense = open_checkpoint(out), open_checkpoint(dense_exports / variant)
    assert sorted(pruned.names) == sorted(dense.names)
    linears = [n for n in pruned.names if n.startswith("layers.") and n.endswith(".weight")]
    # a dense layer holds only linears and their biases (no shortcuts, no norm weights)
    assert {n.split(".", 2)[2].removesuffix(".weight") for n in linears} <= set(PRUNED_LINEARS)
    for name in pruned.names:
        tensor, reference = pruned.tensor(name), dense.tensor(name)
        if name in linears:
            assert (nonzeros_per_group(tensor, TWO_FOUR) == 2).all(), name
            kept = tensor != 0
            if method == "magnitude":  # keeps the values it keeps
                assert torch.equal(tensor[kept], reference[kept]), name
            else:  # compensates the pruned weights by moving the kept ones
                assert not torch.equal(tensor[kept], reference[kept]), name
        else:  # embeddings, positions, head, and every bias
            assert torch.equal(tensor, reference), name

    sparsity = pruned.config["sparsity"]
    assert sparsity["pattern"] == "2:4" and sparsity["method"] == method
    assert len(sparsity["relative_error"]["layers"]) == tiny_config(variant).num_hidden_layers
    assert all(0 < e < 1 for layer in sparsity["relative_error"]["layers"] for e in layer.values())
    calibration_tokens = sum(int(mask.sum()) for _, mask in calibration_batches())  # padding excluded
    assert sparsity["calibration_tokens"] == (calibration_tokens if method == "sparsegpt" else 0)
    logits = load_model(out)(random_tokens(2, 24, seed=7))
    assert logits.shape == (2, 24, tiny_config(variant).vocab_size) and torch.isfinite(logits).all()


def make_two_four(model: torch.nn.Module) -> None:
    """Prune every decoder linear of a Transformers model to 2:4 by magnitude, in place."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(magnitude_prune(module.weight, TWO_FOUR))


# Norm fusion only scales the inputs of RMSNorm families' linears, so a 2:4 model stays 2:4;
# LayerNorm families (OPT, Phi) centre their output linears, which fills the zeros back in.
RMS_VARIANTS = [v for v in VARIANTS if v not in ("opt", "phi")]


@pytest.mark.parametrize("variant", RMS_VARIANTS)
def test_sparsegpt_leaves_a_two_four_model_unchanged(tmp_path, monkeypatch, variant):
    model = tiny_model(tiny_config(variant), seed=0)
    make_two_four(model)
    model.save_pretrained(tmp_path / "hf")
    source = NoTokenizerSource(tmp_path / "hf")
    dense = export_checkpoint(source, tmp_path / "dense", progress=False)
    pruned = prune_checkpoint(
        source, tmp_path / "pruned", calibration_batches(), pattern=TWO_FOUR, method="sparsegpt", progress=False
    )
    # Nothing new to prune: every error to compensate is zero, so every weight is the export's.
    dense_ck, pruned_ck = open_checkpoint(dense), open_checkpoint(pruned)
    for name in dense_ck.names:
        assert torch.equal(pruned_ck.tensor(name), dense_ck.tensor(name)), name
    tokens = random_tokens(2, 24, seed=5)
    float64_reference(monkeypatch)
    with torch.no_grad():
        reference = model(tokens).logits
    logits = load_model(pruned)(tokens)
    assert torch.equal(logits, load_model(dense)(tokens))
    assert (logits - reference).abs().max() / reference.abs().max() < 1e-9


def test_pattern_must_divide_every_input_width(models, tmp_path):
    with pytest.raises(SliceserveError, match="not a multiple of 3"):
        prune_checkpoint(
            NoTokenizerSource(models / "llama"),
            tmp_path / "out",
            None,
            pattern=NMPattern(1, 3),
            method="magnitude",
            progress=False,
        )
    assert_nothing_written(tmp_path / "out")


# -- the real SmolLM2-135M ------------------------------------------------------------------------

SMOLLM2_SEQLEN = 256
SMOLLM2_WINDOWS = 8
# Measured (CPU, float32; calibration 8 x 256 of wiki.valid.raw, seed 42; first 8 windows of 256
# of wiki.test.raw, as tests/test_smollm2.py): dense 39.97, SparseGPT 2:4 120.97, magnitude 2:4
# 24071.6. The SparseGPT bound leaves ~10% for BLAS differences; magnitude 2:4 is ~200x worse.
SPARSEGPT_PPL_BOUND = 133.0
MAGNITUDE_OVER_SPARSEGPT = 20.0


@pytest.mark.slow
def test_smollm2_sparsegpt_beats_magnitude(tmp_path):
    source = open_source("smollm2-135m")
    tokenizer = source.tokenizer()
    source.tokenizer = lambda: tokenizer  # building it from the GGUF takes seconds; both checkpoints share it
    tokens = evaluation_tokens(tokenizer, wikitext2_text("test"))
    batches = load_calibration("wikitext2", tokenizer, nsamples=8, seqlen=SMOLLM2_SEQLEN, seed=42, batch_size=4)
    ppl = {}
    for method in METHODS:
        out = prune_checkpoint(source, tmp_path / method, batches, pattern=TWO_FOUR, method=method, progress=False)
        model = load_model(out, verify=False)
        with torch.inference_mode():
            result = perplexity(model, tokens, seqlen=SMOLLM2_SEQLEN, max_windows=SMOLLM2_WINDOWS, progress=False)
        ppl[method] = result["ppl"]
    assert 39.9 < ppl["sparsegpt"] < SPARSEGPT_PPL_BOUND, ppl
    assert ppl["magnitude"] > MAGNITUDE_OVER_SPARSEGPT * ppl["sparsegpt"], ppl


# -- the command line --------------------------------------------------------------------------------

CALIBRATION = ["--nsamples", "4", "--seqlen", "16", "--batch-size", "2"]


@pytest.fixture(scope="module")
def cli_work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    text = " ".join(["the quick brown fox jumps over the lazy dog while a small cat sleeps"] * 30)
    (work / "some.txt").write_text(text)
    save_tiny_llama(work / "tiny", text)  # width 64, intermediate 128, 4 heads of 16
    return work


def test_prune_command_and_info(cli_work, tmp_path):
    out = tmp_path / "pruned"
    done = run_sliceserve(
        "prune",
        cli_work / "tiny",
        "--pattern",
        "2:4",
        "--method",
        "sparsegpt",
        "--calibration",
        cli_work / "some.txt",
        *CALIBRATION,
        "--dtype",
        "float32",
        "--out",
        out,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "relative output error" in done.stderr  # logged per layer
    info = run_sliceserve("info", out, cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "2:4 sparse (sparsegpt)" in info.stdout and "sparsity     2:4 (sparsegpt)" in info.stdout
    summary = json.loads(run_sliceserve("info", out, "--json", cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert summary["sparsity"]["calibration"] == {
        "source": str(cli_work / "some.txt"),
        "nsamples": 4,
        "seqlen": 16,
        "batch_size": 2,
        "seed": 42,
    }
    assert summary["dtype"] == "float32" and not summary["sliced"]


def test_magnitude_reads_no_calibration(cli_work, tmp_path):
    out = tmp_path / "pruned"
    done = run_sliceserve(
        "prune",
        cli_work / "tiny",
        "--method",
        "magnitude",
        "--calibration",
        tmp_path / "missing.txt",
        "--out",
        out,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert open_checkpoint(out).config["sparsity"]["calibration"] is None


PRUNE_CASES = {
    # name: (extra arguments, words the error must hold)
    "pattern-not-n-m": (["--pattern", "2/4"], ["--pattern", "N:M"]),
    "pattern-n-not-below-m": (["--pattern", "4:4"], ["--pattern 4:4", "0 < N < M"]),
    "pattern-n-zero": (["--pattern", "0:4"], ["--pattern 0:4", "0 < N < M"]),
    "width-not-multiple": (["--pattern", "2:3"], ["--pattern 2:3", "64", "not a multiple of 3"]),
    "wide-group": (["--pattern", "2:256"], ["not a multiple of 256"]),
    "unknown-method": (["--method", "random"], ["unknown pruning method", "random", "sparsegpt", "magnitude"]),
    "missing-calibration": (["--calibration", "{work}/missing.txt"], ["missing.txt", "does not exist"]),
    "seqlen-too-long": (["--seqlen", "100"], ["--seqlen 100", "64 positions"]),
}


@pytest.mark.parametrize("name", list(PRUNE_CASES))
def test_prune_refuses(cli_work, tmp_path, name):
    extra, words = PRUNE_CASES[name]
    options = {"--calibration": str(cli_work / "some.txt"), **dict(zip(CALIBRATION[::2], CALIBRATION[1::2]))}
    options.update({flag: value.format(work=cli_work) for flag, value in zip(extra[::2], extra[1::2])})
    out = tmp_path / "out"
    result = run_sliceserve(
        "prune", cli_work / "tiny", *[i for pair in options.items() for i in pair], "--out", out, cwd=tmp_path
    )
    assert_one_line_error(result, *words)
    assert_nothing_written(out)
