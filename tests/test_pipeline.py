"""Pipeline stages in one process: the layers split over two devices ("cpu", "cpu" here, as
CI has no GPU) give the very logits and greedy texts of the single-device model, for a
sequential block (Llama) and a parallel one (Phi), dense and sliced; and the options that
place the stages (`--devices`, `--gpus`, `--gpu-memory`) say plainly what is wrong.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from cli_support import run_cli
from server_support import build_tokenizer, checkpoint_path
from tiny_models import calibration_batches, tiny_config, tiny_model

from sliceserve.engine.engine import Engine
from sliceserve.engine.requests import SamplingParams
from sliceserve.errors import SliceserveError
from sliceserve.model.loader import load_model, load_tokenizer
from sliceserve.parallel.loading import load_pipeline
from sliceserve.parallel.pipeline import Pipeline
from sliceserve.planning.memory import Workload, stage_costs
from sliceserve.planning.model_shape import read_model_shape
from sliceserve.planning.placement import checkpoint_stage_ranges
from sliceserve.planning.planner import balanced_stages
from sliceserve.slicing.checkpoint_writer import export_checkpoint, slice_checkpoint
from sliceserve.slicing.sources import FolderSource

TWO_STAGES = [range(0, 1), range(1, 2)]
MAX_LEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two-layer models with a tokenizer: Llama float32 (the server tests' model) and Phi
    float64 (parallel block, partial rotary, biases), each sliced at 25% and exported dense."""
    llama_sliced = checkpoint_path(tmp_path_factory)
    llama_dense = export_checkpoint(
        FolderSource(llama_sliced.parent / "dense"), tmp_path_factory.mktemp("llama") / "dense", progress=False
    )
    tokenizer = build_tokenizer()
    config = tiny_config("phi")
    config.vocab_size = len(tokenizer)
    folder = tmp_path_factory.mktemp("phi")
    tiny_model(config).save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    phi_sliced = slice_checkpoint(
        FolderSource(folder / "hf"), folder / "sliced", calibration_batches(), sparsity=0.25, progress=False
    )
    phi_dense = export_checkpoint(FolderSource(folder / "hf"), folder / "dense", progress=False)
    return {"llama-sliced": llama_sliced, "llama-dense": llama_dense, "phi-sliced": phi_sliced, "phi-dense": phi_dense}


MODELS = ["llama-sliced", "llama-dense", "phi-sliced", "phi-dense"]


def random_ids(count: int, seed: int, vocab: int = 250) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(count)]


def cached_logits(model, prompts: list[list[int]], steps: int, chunk: int = 5) -> list[torch.Tensor]:
    """Every logits tensor of: each prompt prefilled in chunks (one slot each), then `steps`
    greedy decode steps of all rows together, padded with one scratch row."""
    outputs = []
    cache = model.new_cache(slots=len(prompts), max_len=MAX_LEN)
    device = model.input_device
    last = []
    with torch.inference_mode():
        for slot, ids in enumerate(prompts):
            for start in range(0, len(ids), chunk):
                piece = ids[start : start + chunk]
                logits = model.forward_cached(
                    torch.tensor([piece], device=device),
                    torch.arange(start, start + len(piece), device=device)[None],
                    torch.tensor([slot], device=device),
                    cache,
                    last_only=True,
                )
                outputs.append(logits)
            last.append(int(logits[0, -1].argmax()))
        lengths = [len(ids) for ids in prompts]
        for _ in range(steps):
            tokens = torch.tensor(last + [0], device=device)[:, None]
            positions = torch.tensor(lengths + [0], device=device)[:, None]
            slots = torch.tensor(list(range(len(prompts))) + [cache.scratch_slot], device=device)
            logits = model.forward_cached(tokens, positions, slots, cache)
            outputs.append(logits)
            last = [int(row.argmax()) for row in logits[: len(prompts), 0]]
            lengths = [n + 1 for n in lengths]
    return outputs


@pytest.mark.parametrize("name", MODELS)
def test_pipeline_logits_equal_single_device(checkpoints, name):
    single = load_model(checkpoints[name])
    pipeline = load_pipeline(checkpoints[name], ["cpu", "cpu"], TWO_STAGES)
    tokens = torch.tensor([random_ids(20, 1), random_ids(20, 2)])
    with torch.inference_mode():
        assert torch.equal(pipeline(tokens), single(tokens))
    prompts = [random_ids(12, 3), random_ids(7, 4), random_ids(3, 5)]
    expected, actual = cached_logits(single, prompts, steps=6), cached_logits(pipeline, prompts, steps=6)
    assert len(expected) == len(actual) == 3 + 2 + 1 + 6
    for e, a in zip(expected, actual):
        assert torch.equal(a, e)


def greedy_texts(model, tokenizer, prompts: list[list[int]], max_tokens: int = 12) -> list[tuple[list[int], str]]:
    engine = Engine(model, tokenizer, max_batch=2, max_model_len=MAX_LEN, prefill_chunk=5)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    results: list = [None] * len(prompts)

    def collect(i: int) -> None:
        events = list(engine.generate(prompts[i], params))
        results[i] = ([t for e in events for t in e.token_ids], "".join(e.text for e in events))

    engine.start()
    try:
        threads = [threading.Thread(target=collect, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        engine.shutdown()
    return results


@pytest.mark.parametrize("name", MODELS)
def test_pipeline_greedy_texts_equal_single_device(checkpoints, name):
    tokenizer = load_tokenizer(checkpoints[name])
    prompts = [
        tokenizer("ka lo mi ra")["input_ids"],
        tokenizer("ten sul or")["input_ids"],
        tokenizer("ve an dis po que")["input_ids"],
    ]  # three prompts over two slots: one waits
    single = greedy_texts(load_model(checkpoints[name]), tokenizer, prompts)
    pipelined = greedy_texts(load_pipeline(checkpoints[name], ["cpu", "cpu"], TWO_STAGES), tokenizer, prompts)
    assert all(len(ids) == 12 for ids, _ in single)
    assert pipelined == single


def test_each_stage_holds_only_its_part(checkpoints):
    pipeline = load_pipeline(checkpoints["llama-sliced"], ["cpu", "cpu"], TWO_STAGES)
    first, second = (stage.model for stage in pipeline.stages)
    assert isinstance(pipeline, Pipeline) and not pipeline.fast and pipeline.input_device == torch.device("cpu")
    assert first.embed is not None and first.head is None and len(first.layers) == 1
    assert second.embed is None and second.head is not None and len(second.layers) == 1
    single = load_model(checkpoints["llama-sliced"])
    held = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert held(first) + held(second) == held(single)
    cache, single_cache = pipeline.new_cache(slots=3, max_len=16), single.new_cache(slots=3, max_len=16)
    assert len(cache.keys) == len(cache.values) == 2 and cache.scratch_slot == 3
    assert cache.bytes == single_cache.bytes


def test_stage_ranges_come_from_the_planner(checkpoints):
    path = checkpoints["phi-sliced"]
    assert checkpoint_stage_ranges(path, 2, max_batch=2, max_model_len=MAX_LEN) == TWO_STAGES
    assert checkpoint_stage_ranges(path, 1, max_batch=2, max_model_len=MAX_LEN) == [range(0, 2)]
    with pytest.raises(SliceserveError, match="cannot cut 2 layers into 3 stages"):
        checkpoint_stage_ranges(path, 3, max_batch=2, max_model_len=MAX_LEN)
    # a budget that two stages meet and one does not
    shape = read_model_shape(path)
    costs = stage_costs(shape.spec, shape.biases, Workload(dtype="float64", batch=2, context=MAX_LEN))
    two = max(stage.total for stage in balanced_stages(costs, 2))
    assert checkpoint_stage_ranges(path, 2, max_batch=2, max_model_len=MAX_LEN, budget=two) == TWO_STAGES
    with pytest.raises(SliceserveError, match="1 device.* too few: the largest stage needs .* the plan needs 2"):
        checkpoint_stage_ranges(path, 1, max_batch=2, max_model_len=MAX_LEN, budget=two)
    with pytest.raises(SliceserveError, match="cannot fit on cards of 512.0 MiB"):  # under the 1 GiB reserve
        checkpoint_stage_ranges(path, 2, max_batch=2, max_model_len=MAX_LEN, budget=2**29)


def test_load_pipeline_refuses_bad_ranges(checkpoints):
    with pytest.raises(SliceserveError, match="contiguous"):
        load_pipeline(checkpoints["llama-sliced"], ["cpu", "cpu"], [range(0, 1), range(0, 2)])
    with pytest.raises(SliceserveError, match="2 devices for 1 stages"):
        load_pipeline(checkpoints["llama-sliced"], ["cpu", "cpu"], [range(0, 2)])


# ---- the command line ----------------------------------------------------------------------


def test_generate_over_two_devices(checkpoints, capsys):
    common = ["generate", checkpoints["llama-sliced"], "ka lo mi", "--max-tokens", "10", "--max-model-len", MAX_LEN]
    code, single, _ = run_cli(capsys, *common)
    assert code == 0 and len(single) > len("ka lo mi")
    code, pipelined, _ = run_cli(capsys, *common, "--devices", "cpu,cpu")
    assert code == 0 and pipelined == single
    code, budgeted, _ = run_cli(capsys, *common, "--devices", "cpu,cpu", "--gpu-memory", "4GiB")
    assert code == 0 and budgeted == single  # no effect on a CPU (a warning), the stages fit


@pytest.mark.parametrize(
    "options, words",
    [
        (["--gpus", "2"], "--gpus 2 asked for, but 0 GPU(s) are available"),
        (["--gpus", "1", "--devices", "cpu"], "give --gpus or --devices, not both"),
        (["--devices", "cpu,tpu9"], "unknown device 'tpu9'"),
        (["--devices", "cpu,cpu", "--gpu-memory", "512MiB"], "cannot fit on cards of 512.0 MiB"),
        (["--gpu-memory", "lots"], "needs a number and a unit"),
        (["--distributed", "--devices", "cpu,cpu"], "drop --gpus/--devices"),
        (["--micro-batches", "0"], "--micro-batches must be at least 1"),
        (["--distributed"], "launch with torchrun"),
    ],
)
def test_placement_errors(checkpoints, capsys, monkeypatch, options, words):
    if torch.cuda.is_available() and options[:1] == ["--gpus"]:
        pytest.skip("this machine has GPUs")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code, out, err = run_cli(capsys, "generate", checkpoints["llama-sliced"], "ka", "--max-tokens", "2", *options)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sliceserve: error:") and words in err, err
