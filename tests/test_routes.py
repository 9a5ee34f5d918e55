"""The server's other routes over real HTTP: /tokenize, /detokenize, /version, /v1/models; and
token logprobs for tokens that hold part of a UTF-8 character (their raw bytes, and top_logprobs
that keep n distinct entries however many of them read "\\ufffd" alone).

The model here is a tiny random dense Llama whose byte-level tokenizer has all 256 bytes as
tokens: half of them are pieces of multi-byte characters."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from server_support import CHAT_TEMPLATE, SPECIAL_TOKENS, bytes_to_unicode, checkpoint_path, start_server

import sliceserve
from sliceserve.engine.loading import load_engine

MODEL = "tiny"
MAX_MODEL_LEN = 96
CHARACTERS = "中文字符 — naïve café 🙂 ok"


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["kalo mira tensul ve an dis po que"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def byte_server(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sliceserve.slicing.checkpoint_writer import export_checkpoint
    from sliceserve.slicing.sources import open_source

    folder = tmp_path_factory.mktemp("byte_model")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    checkpoint = export_checkpoint(open_source(str(folder / "hf")), folder / "dense", progress=False)
    with start_server(load_engine(checkpoint, max_batch=2, max_model_len=MAX_MODEL_LEN), model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The shared sliced test model, whose tokenizer has a chat template."""
    with start_server(load_engine(checkpoint_path(tmp_path_factory), max_batch=2, max_model_len=64)) as running:
        yield running


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_tokenize_and_detokenize(server):
    tokenizer = server.engine.tokenizer
    text = "kalo mira tensul"
    answer = post(server, "/tokenize", {"prompt": text}).json()
    ids = tokenizer(text)["input_ids"]
    assert answer == {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": None}
    named = post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert named["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    messages = [{"role": "user", "content": text}]
    chat = post(server, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": text}
    assert post(server, "/tokenize", {"prompt": ""}).json()["count"] == 0
    for path, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
        ("/tokenize", {"prompt": "a", "chat_template": "x"}, "chat_template"),
        ("/tokenize", {"prompt": "a", "frobnicate": 1}, "frobnicate"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ]:
        response = post(server, path, body)
        assert response.status_code in (400, 404), (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.json())


def test_version_and_models(server):
    assert httpx.get(server.url + "/version").json() == {"version": sliceserve.__version__}
    card = httpx.get(server.base_url + "/models").json()["data"][0]
    assert card["max_model_len"] == server.engine.max_model_len == 64  # the engine's, not the model's 1024
    assert card["vocab_size"] == server.engine.model.spec.vocab_size
    assert httpx.get(server.base_url + f"/models/{card['id']}").json() == card


def byte_names(tokenizer) -> dict[str, int]:
    """An independent reading of the vocabulary: each token's bytes, from its byte-level piece."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(SPECIAL_TOKENS)
    return {
        i: piece.encode() if piece in special else bytes(byte_of[c] for c in piece)
        for piece, i in tokenizer.get_vocab().items()
    }


def partial(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_chat_logprobs_carry_raw_bytes(byte_server):
    tokenizer = byte_server.engine.tokenizer
    raw = byte_names(tokenizer)
    client = openai.OpenAI(base_url=byte_server.base_url, api_key="unused", max_retries=0)
    # the bytes of "中" and "🙂", sampled in any order: most tokens end inside a character
    allowed = [tokenizer.convert_tokens_to_ids(bytes_to_unicode()[b]) for b in "中🙂".encode()]
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=24,
        temperature=1.0,
        seed=3,
        logprobs=True,
        top_logprobs=20,
        extra_body={"allowed_token_ids": allowed},
    )
    content = result.choices[0].logprobs.content
    assert len(content) == 24
    seen_partial = 0
    for entry in content:
        for item in [entry, *entry.top_logprobs]:
            if item.token.startswith("bytes:"):
                seen_partial += 1
                assert partial(bytes(item.bytes))
                assert item.token == "bytes:" + "".join(f"\\x{b:02x}" for b in item.bytes)
            else:
                assert bytes(item.bytes) == item.token.encode()
        assert len({bytes(t.bytes) for t in entry.top_logprobs}) == 20  # 20 distinct tokens, none collapsed
    assert seen_partial > 24
    generated = b"".join(bytes(entry.bytes) for entry in content)
    assert generated.decode("utf-8", errors="replace") == result.choices[0].message.content
    assert all(bytes(entry.bytes) in raw.values() for entry in content)


def test_completion_top_logprobs_keep_n_entries(byte_server):
    tokenizer = byte_server.engine.tokenizer
    raw = byte_names(tokenizer)
    prompt = tokenizer(CHARACTERS)["input_ids"]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 20, "echo": True}
    choice = post(byte_server, "/v1/completions", body).json()["choices"][0]
    logprobs = choice["logprobs"]
    tops = logprobs["top_logprobs"]
    assert tops[0] is None and all(len(top) == 20 for top in tops[1:])
    assert sum(key.startswith("bytes:") for top in tops[1:] for key in top) > len(tops)
    # the echoed prompt's tokens: pieces of characters are named by their bytes
    for token_id, name in zip(prompt, logprobs["tokens"]):
        expected = raw[token_id]
        assert name == ("bytes:" + "".join(f"\\x{b:02x}" for b in expected) if partial(expected) else expected.decode())
    assert choice["text"].startswith(CHARACTERS)
    # offsets: a token inside a character starts where the character does
    prefixes = [b"".join(raw[t] for t in prompt[:i]) for i in range(len(prompt))]
    assert logprobs["text_offset"][: len(prompt)] == [len(p.decode("utf-8", errors="ignore")) for p in prefixes]
    as_ids = post(byte_server, "/v1/completions", {**body, "return_tokens_as_token_ids": True}).json()
    assert as_ids["choices"][0]["logprobs"]["tokens"][: len(prompt)] == [f"token_id:{t}" for t in prompt]
