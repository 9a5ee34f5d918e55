"""Pipeline stages on the fast path (parallel/pipeline.py, parallel/stages.py): two stages
whose layers run the fast path's kernels give the very logits of the single-device
`FastTransformer`, bit for bit: the stream and its partial sums of squares cross the stage
boundary unchanged. Without a GPU the kernels run in Triton's interpreter (slow: a tiny
model, a few tokens); both stages sit on the CPU.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from kernel_support import DEVICE  # sets TRITON_INTERPRET first
from server_support import checkpoint_path
from torchrun_support import environment, torchrun_command

from sliceserve.checkpoint import checkpoint_spec, open_checkpoint
from sliceserve.errors import SliceserveError
from sliceserve.fast.model import FastTransformer
from sliceserve.model.loader import load_model
from sliceserve.parallel.loading import build_stage, load_pipeline
from sliceserve.parallel.messages import Header, Kind
from sliceserve.parallel.pipeline import Pipeline
from sliceserve.parallel.stages import FastStage
from sliceserve.slicing.checkpoint_writer import export_checkpoint
from sliceserve.slicing.sources import FolderSource

TWO_STAGES = [range(0, 1), range(1, 2)]
HERE = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["sliced", "dense"])
def checkpoint(request, tmp_path_factory) -> Path:
    """The server tests' two-layer Llama (float32), sliced at 25% or exported dense."""
    sliced = checkpoint_path(tmp_path_factory)
    if request.param == "sliced":
        return sliced
    return export_checkpoint(
        FolderSource(sliced.parent / "dense"), tmp_path_factory.mktemp("llama") / "dense", progress=False
    )


def fast_pipeline(path: Path) -> Pipeline:
    """Both stages on DEVICE, each the fast path over one layer."""
    checkpoint = open_checkpoint(path)
    spec = checkpoint_spec(checkpoint.config)
    device = torch.device(DEVICE)
    return Pipeline(
        [
            FastStage(build_stage(checkpoint, spec, layers, first=i == 0, last=i == 1, device=device), device)
            for i, layers in enumerate(TWO_STAGES)
        ]
    )


def ids(count: int, seed: int, vocab: int = 250) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count,), generator=generator).tolist()


def cached_logits(model, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Each prompt prefilled in two chunks (one slot each), then `steps` greedy decode steps of
    every row together, padded with one scratch row."""
    cache = model.new_cache(slots=len(prompts), max_len=16)
    outputs, last = [], []
    as_tensor = lambda values: torch.tensor(values, device=DEVICE)  # noqa: E731
    for slot, prompt in enumerate(prompts):
        half = len(prompt) // 2
        for chunk, start in ((prompt[:half], 0), (prompt[half:], half)):
            logits = model.forward_cached(
                as_tensor([chunk]),
                torch.arange(start, start + len(chunk), device=DEVICE)[None],
                as_tensor([slot]),
                cache,
                last_only=True,
            )
            outputs.append(logits)
        last.append(int(logits[0, -1].argmax()))
    lengths = [len(p) for p in prompts]
    for _ in range(steps):
        logits = model.forward_cached(
            as_tensor(last + [0])[:, None],
            as_tensor(lengths + [0])[:, None],
            as_tensor(list(range(len(prompts))) + [cache.scratch_slot]),
            cache,
        )
        outputs.append(logits)
        last = [int(row.argmax()) for row in logits[: len(prompts), 0]]
        lengths = [n + 1 for n in lengths]
    return outputs


@torch.inference_mode()
def test_fast_stages_give_the_single_device_logits(checkpoint):
    single, pipeline = FastTransformer(load_model(checkpoint, device=DEVICE)), fast_pipeline(checkpoint)
    tokens = torch.tensor([ids(6, 1), ids(6, 2)], device=DEVICE)
    assert torch.equal(pipeline(tokens), single(tokens))
    prompts = [ids(5, 3), ids(3, 4)]
    expected, actual = cached_logits(single, prompts, steps=2), cached_logits(pipeline, prompts, steps=2)
    assert len(expected) == len(actual) == 2 * 2 + 2
    for e, a in zip(expected, actual):
        assert torch.equal(a, e)


def test_each_fast_stage_holds_only_its_part(tmp_path_factory):
    pipeline = fast_pipeline(checkpoint_path(tmp_path_factory))
    first, second = (stage.model for stage in pipeline.stages)
    assert first.embed is not None and first.head is None and len(first.layers) == 1
    assert second.embed is None and second.head is not None and len(second.layers) == 1
    assert second.input_device == second.device == torch.device(DEVICE)
    assert second.dtype == first.dtype == torch.float32
    cache = pipeline.new_cache(slots=3, max_len=8)
    assert [len(kv.keys) for kv in cache.stages] == [1, 1] and cache.scratch_slot == 3
    assert pipeline.padded_decode_rows(3, 8) == 4 and pipeline.padded_decode_rows(3, 2) == 2


def test_stage_stream_headers_carry_the_partial_sums_width():
    x, px = torch.zeros(3, 5, 64), torch.zeros(3, 5, 2)
    header = Header.for_activations(Kind.STEP, [x, px], last_only=True)
    assert Header.from_tensor(header.tensor(torch.device("cpu"))) == header
    assert (header.rows, header.length, header.width, header.partials, header.last_only) == (3, 5, 64, 2, True)
    assert Header.for_activations(Kind.FORWARD, [x]).partials == 0


def test_fast_runtime_pipeline_on_a_cpu_is_a_clear_error(tmp_path_factory):
    path = checkpoint_path(tmp_path_factory)
    with pytest.raises(SliceserveError, match="the fast runtime needs a CUDA device"):
        load_pipeline(path, ["cpu", "cpu"], TWO_STAGES, runtime="fast")


@torch.inference_mode()
def test_two_processes_on_the_fast_path_match_the_single_device(tmp_path_factory, tmp_path):
    """As test_distributed.py, with every stage on the fast path (the stream's partial sums of
    squares sent along): bit for bit, the decode steps against the same two-row pieces."""
    path, out = checkpoint_path(tmp_path_factory), tmp_path / "pipeline.pt"
    result = subprocess.run(
        torchrun_command(HERE / "distributed_stages.py", path, out, "fast"),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stage 1 of 2: layers 1 on cpu (gloo), fast path" in result.stderr
    got, model = torch.load(out), FastTransformer(load_model(path))
    prompts = got["prompts"]
    assert torch.equal(got["forward"], model(torch.tensor([prompts[0][:3] + prompts[1][:3]])))
    cache = model.new_cache(slots=4, max_len=64)
    for slot, prompt in enumerate(prompts):
        expected = model.forward_cached(
            torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([slot]), cache, last_only=True
        )
        assert torch.equal(got["prefill"][slot], expected)
    last, lengths = [int(logits[0, -1].argmax()) for logits in got["prefill"]], [len(p) for p in prompts]
    for step in got["decode"]:
        tokens, positions = torch.tensor(last)[:, None], torch.tensor(lengths)[:, None]
        pieces = [
            model.forward_cached(tokens[rows], positions[rows], torch.arange(4)[rows], cache)
            for rows in (slice(0, 2), slice(2, 4))
        ]
        assert torch.equal(step, torch.cat(pieces))
        last, lengths = [int(row.argmax()) for row in step[:, 0]], [n + 1 for n in lengths]
