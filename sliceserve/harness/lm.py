"""The lm-eval model `sliceserve`: lm-evaluation-harness scores through our runtime in this
process (`sliceserve eval`, or `lm_eval.simple_evaluate(model="sliceserve",
model_args="pretrained=CKPT")` once this module is imported: importing it registers the name).

It follows lm-eval's Hugging Face model (HFLM) where results depend on it, so that the two give
the same numbers on the same weights: no special tokens added, the BOS token (else EOS) before
an empty context, inputs cut from the left to `max_length`, rolling windows of `max_length`."""

from __future__ import annotations

from pathlib import Path

import lm_eval
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences
from tqdm import tqdm

from sliceserve.errors import SliceserveError
from sliceserve.harness.generation import greedy_until
from sliceserve.harness.scorer import ScoringModel, open_scoring_model
from sliceserve.harness.scoring import score_continuations
from sliceserve.slicing.checkpoint_writer import DTYPES, library_versions

DEFAULT_MAX_GEN_TOKS = 256  # as HFLM


@register_model("sliceserve")
class SliceserveLM(TemplateLM):
    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        runtime: str = "auto",
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; batches are fixed here
        scoring_model: ScoringModel | None = None,
    ) -> None:
        """pretrained: a checkpoint folder (or a Hugging Face folder, .gguf file, demo name);
        scoring_model: an already open model instead. max_length: tokens per forward pass
        (default: the model's positions)."""
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise SliceserveError("batch size 'auto' is not supported: give a number")
        if dtype is not None and dtype not in DTYPES:
            raise SliceserveError(f"unknown dtype {dtype!r}: one of {', '.join(DTYPES)}")
        if scoring_model is None:
            if pretrained is None:
                raise SliceserveError("the sliceserve model needs pretrained=CHECKPOINT")
            scoring_model = open_scoring_model(
                pretrained, device=device, dtype=DTYPES[dtype] if dtype else None, runtime=runtime
            )
        self.model = scoring_model
        self.tokenizer = scoring_model.tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or scoring_model.max_positions)
        if self._max_length > scoring_model.max_positions:
            raise SliceserveError(
                f"max length {self._max_length} exceeds the model's {scoring_model.max_positions} positions"
            )
        self.max_gen_toks = int(max_gen_toks)
        self.info = {"model": str(pretrained), "runtime": scoring_model.runtime, "device": device, "dtype": dtype}

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def get_model_info(self) -> dict:
        """What lm-eval records under results["config"]: what ran, where, in which dtype, with what."""
        versions = {**library_versions(), "lm_eval": lm_eval.__version__}
        return {**self.info, "max_length": self.max_length, "batch_size": self.batch_size, "versions": versions}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key, context tokens, continuation tokens); longest first, so that a
        batch pads little and the first one shows the memory the run needs."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="scoring") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                pairs = [(context, continuation) for _, context, continuation in chunk]
                scores = score_continuations(self.model.logits, pairs, max_length=self.max_length, pad_id=pad)
                for (key, _, _), score in zip(chunk, scores):
                    if key is not None:  # rolling windows have none; their sums are cached instead
                        self.cache_hook.add_partial("loglikelihood", key, score)
                results += scores
                bar.update(len(chunk))
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over disjoint windows of max_length (lm-eval's rolling
        windows: each window conditions on the tokens before it, up to max_length in all)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            pairs = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut before its first stop string (the EOS text among them)."""
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        answers = []
        for context, asked in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generating"):
            settings = dict(asked)
            if settings.pop("do_sample", False) or (settings.get("temperature") or 0) > 0:
                raise SliceserveError("sliceserve eval generates greedily only; a task asked for sampling")
            stops = handle_stop_sequences(settings.pop("until", None), eos=eos_text)
            max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
            if max_new >= self.max_length:
                raise SliceserveError(
                    f"max_gen_toks {max_new} leaves no room for a prompt in {self.max_length} positions"
                )
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
            text = greedy_until(
                self.model.logits,
                prompt,
                decode=self.tokenizer.decode,
                stops=stops,
                max_new_tokens=max_new,
                stop_token_id=self.eot_token_id,
            )
            self.cache_hook.add_partial("generate_until", (context, asked), text)
            answers.append(text)
        return answers
