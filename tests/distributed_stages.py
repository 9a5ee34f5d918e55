"""Run by tests/test_distributed.py under torchrun: one stage per process, over gloo.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_stages.py CHECKPOINT OUT.pt [fast]

Every rank joins through the same functions `sliceserve serve/generate --distributed` use;
rank 0 then records what the pipeline computes (torch.save to OUT.pt) for the test to compare
with the single-device model: logits without a cache, cached prefill logits, micro-batched
decode logits, and greedy texts from an engine over the pipeline. With `fast`, every stage
runs the fast path (as on GPUs), its kernels in Triton's interpreter, and the slow engine
part is left out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

FAST = sys.argv[3:] == ["fast"]
if FAST:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from sliceserve.commands import placement  # noqa: E402
from sliceserve.commands.placement import is_stage_worker, placed_model, run_stage_worker  # noqa: E402
from sliceserve.engine.engine import Engine  # noqa: E402
from sliceserve.engine.requests import SamplingParams  # noqa: E402
from sliceserve.model.loader import load_tokenizer  # noqa: E402

MAX_BATCH, MAX_LEN = 4, 64
PROMPTS = ["ka lo mi ra", "ten sul or", "ve an dis po que", "stra ni el bu"]


def options() -> argparse.Namespace:
    return argparse.Namespace(
        device="cpu",
        max_batch=MAX_BATCH,
        max_model_len=MAX_LEN,
        gpus=None,
        devices=None,
        gpu_memory=None,
        distributed=True,
        micro_batches=2,
    )


def record(model, tokenizer) -> dict:
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    result: dict = {"prompts": prompts}
    with torch.inference_mode():
        result["forward"] = model.forward(torch.tensor([prompts[0][:3] + prompts[1][:3]]))
        cache = model.new_cache(slots=MAX_BATCH, max_len=MAX_LEN)
        result["prefill"] = [
            model.forward_cached(
                torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([slot]), cache, last_only=True
            )
            for slot, ids in enumerate(prompts)
        ]
        last = [int(logits[0, -1].argmax()) for logits in result["prefill"]]
        lengths = [len(ids) for ids in prompts]
        result["decode"] = []
        for _ in range(4):  # four rows, cut into two micro-batches of two
            logits = model.forward_cached(
                torch.tensor(last)[:, None], torch.tensor(lengths)[:, None], torch.arange(MAX_BATCH), cache
            )
            result["decode"].append(logits)
            last, lengths = [int(row.argmax()) for row in logits[:, 0]], [n + 1 for n in lengths]
    if FAST:
        return result
    engine = Engine(model, tokenizer, max_batch=2, max_model_len=MAX_LEN, prefill_chunk=5)
    engine.start()
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        result["texts"] = ["".join(event.text for event in engine.generate(ids, params)) for ids in prompts]
    finally:
        engine.shutdown()
    return result


def main(checkpoint: str, out: str) -> int:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = options()
    if FAST:  # what `--runtime auto` chooses on a GPU, here on the CPU
        placement.runs_fast_path = lambda args, device: True
    if is_stage_worker(args):
        return run_stage_worker(checkpoint, args)
    model = placed_model(checkpoint, args)
    try:
        torch.save(record(model, load_tokenizer(checkpoint)), out)
    finally:
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
