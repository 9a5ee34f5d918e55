"""Structured output on the CPU: xgrammar, llguidance and outlines-core, side by side (issue 14).

With the demo model's tokenizer (SmolLM2-135M-Instruct, 49,152 tokens), for each library that
imports, this times:

- building its token table (once per tokenizer) and compiling two grammars: json_object (any JSON
  object, `{"type": "object"}` as the server compiles it) and a moderate JSON schema (SCHEMA);
- the per-token work of structured decoding: for one valid JSON document (DOCUMENT, tokenized once,
  the same token ids for every library, then eos), the time to fill the allowed-token mask and to
  advance the matcher with the token, for 1 row and for 16 rows (filled one row after another, as
  sliceserve.engine.grammar does each step, and with the library's batched call where it has one);
  the 16 rows are staggered through the document, each with its own fresh matcher per document;
- that every mask allows the document's next token (and eos at the end), and how far the masks of
  the libraries differ (allowed-token counts and symmetric differences at every step);
- applying a packed (rows, ceil(V / 32)) int32 bitmask to (rows, V) float32 logits in torch.

The grammars follow what the server asks xgrammar for (compile_json_schema with any_whitespace=False,
whose separators are ", " and ": "): llguidance gets whitespace_flexible=False with the same
separators; outlines-core's regex keeps its default optional single space (`[ ]?`), the closest it
has. Libraries are measured in interleaved rounds so that a change of background load hits all.

    python benchmarks/grammar_overhead.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import versions, write_json

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / ".tokenizer" / "smollm2"
VOCAB = 49152  # SmolLM2's embedding rows = len(tokenizer)
WORDS = (VOCAB + 31) // 32
STOP = (2,)  # <|im_end|>: the demo model's eos (config and tokenizer), as sliceserve's eos_ids finds it
ROWS = 16
THREADS = 2  # xgrammar's compiler (as the server builds it) and the batched fills

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer", "guest"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
JSON_OBJECT: dict[str, Any] = {"type": "object"}
DOCUMENT: dict[str, Any] = {
    "name": "Ada King, Countess of Lovelace",
    "age": 36,
    "role": "editor",
    "score": 97.25,
    "tags": ["mathematics", "analytical engine", "poetical science", "notes"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "active": True,
}
TEXT = json.dumps(DOCUMENT)  # Python's separators ", " and ": ", xgrammar's with any_whitespace=False
GRAMMARS = {"json_object": JSON_OBJECT, "json_schema": SCHEMA}


# --- the libraries, behind one small interface ------------------------------------------------------


class Library:
    """One grammar library: token table, compile, matcher, fill a bitmask row, advance."""

    name = ""
    package = ""
    mask_format = ""
    batched = ""  # the batched call, where the library has one

    def setup(self) -> None:
        """Import the library (untimed: llguidance.torch and outlines_core.kernels.torch load torch.compile)."""
        raise NotImplementedError

    def build_table(self, tokenizer: Any) -> None:
        """The per-tokenizer token table (every token's bytes), built once per tokenizer."""
        raise NotImplementedError

    def compile(self, schema: dict) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def batch_fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def batch_advance(self, matchers: list, tokens: list[int]) -> list[bool]:
        raise NotImplementedError


class XGrammar(Library):
    name = "xgrammar"
    package = "xgrammar"
    mask_format = "packed int32 bitmask (B, ceil(V/32)), bit t%32 of word t//32 (fill_next_token_bitmask)"
    batched = "BatchGrammarMatcher.batch_fill_next_token_bitmask / batch_accept_token"

    def setup(self) -> None:
        import xgrammar

        self.xgr = xgrammar

    def build_table(self, tokenizer: Any) -> None:
        xgrammar = self.xgr
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=list(STOP))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=THREADS, cache_limit_bytes=256 * 2**20)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=THREADS)

    def compile(self, schema: dict) -> Any:
        self.compiler.clear_cache()  # time the compile, not the cache
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)  # as the server does

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled, override_stop_tokens=list(STOP))

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def batch_fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def batch_advance(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)


class LLGuidance(Library):
    name = "llguidance"
    package = "llguidance"
    mask_format = (
        "packed int32 bitmask (B, ceil(V/32)), same layout as xgrammar's (llguidance.torch.fill_next_token_bitmask)"
    )
    batched = "LLExecutor: llguidance.torch.fill_next_token_bitmask_par / consume_token_par"
    OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def setup(self) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance

    def build_table(self, tokenizer: Any) -> None:
        llguidance = self.llg
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=list(STOP))
        self.executor = llguidance.LLExecutor(num_threads=THREADS)

    def compile(self, schema: dict) -> Any:
        """The grammar text, and one matcher built from it (llguidance compiles when a matcher is made;
        the token masks are computed lazily, during decoding)."""
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=self.OPTIONS)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=1)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled, log_level=1)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def batch_fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.llg.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def batch_advance(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.llg.torch.consume_token_par(self.executor, list(zip(matchers, tokens)))


class OutlinesCore(Library):
    name = "outlines-core"
    package = "outlines-core"
    mask_format = (
        "packed int32 bitmask, one row per call (Guide.write_mask_into via "
        "outlines_core.kernels.torch.fill_next_token_bitmask on a (1, W) row view), same layout"
    )

    def setup(self) -> None:
        import outlines_core
        import outlines_core.json_schema
        import outlines_core.kernels.torch

        self.oc = outlines_core

    def build_table(self, tokenizer: Any) -> None:
        outlines_core = self.oc
        self.vocabulary = outlines_core.Vocabulary(STOP[0], token_bytes(tokenizer))

    def compile(self, schema: dict) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))  # whitespace: "[ ]?"
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        self.oc.kernels.torch.fill_next_token_bitmask(matcher, bitmask[row : row + 1])

    def advance(self, matcher: Any, token: int) -> bool:
        if token in STOP:  # allowed once the regex may end; the Guide has no state after it: generation stops
            return matcher.is_finished()
        matcher.advance(token, return_tokens=False)  # raises on a token the grammar refuses
        return True


LIBRARIES: tuple[type[Library], ...] = (XGrammar, LLGuidance, OutlinesCore)


def token_bytes(tokenizer: Any) -> dict[bytes, list[int]]:
    """Every ordinary token's bytes (byte-level BPE: undo GPT-2's byte -> character map), for
    outlines-core's Vocabulary (its own from_pretrained needs the Hub). Special tokens are left out;
    eos is given to the Vocabulary by id."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_of = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_of[chr(256 + extra)] = b
            extra += 1
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    found: dict[bytes, list[int]] = {}
    for text, token in tokenizer.get_vocab().items():
        if token not in special:
            found.setdefault(bytes(byte_of[c] for c in text), []).append(token)
    return found


# --- measuring ---------------------------------------------------------------------------------------


def stats_us(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {
        "median_us": round(statistics.median(ordered) / 1e3, 2),
        "p99_us": round(ordered[min(n - 1, math.ceil(0.99 * n) - 1)] / 1e3, 2),
        "mean_us": round(statistics.fmean(ordered) / 1e3, 2),
        "max_us": round(ordered[-1] / 1e3, 2),
        "samples": n,
    }


def timed(fn: Callable[[], Any], repeats: int, budget_s: float) -> tuple[Any, list[float]]:
    """fn's last result and its wall times in ms: `repeats` runs, fewer when they pass budget_s."""
    times, result, start = [], None, time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s:
            break
    return result, times


def allowed(bitmask: torch.Tensor) -> torch.Tensor:
    """(B, W) int32 -> (B, VOCAB) bool."""
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :VOCAB]


def has(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def check_pass(lib: Library, compiled: Any, seq: list[int]) -> dict:
    """Untimed: the mask at every step, whether it allows the document's token, and its count."""
    matcher = lib.matcher(compiled)
    bitmask = torch.full((1, WORDS), -1, dtype=torch.int32)
    masks, refused, counts = [], [], []
    for step, token in enumerate(seq):
        lib.fill(matcher, bitmask, 0)
        mask = allowed(bitmask)[0]
        masks.append(mask)
        counts.append(int(mask.sum()))
        if not mask[token]:
            refused.append(step)
        if not lib.advance(matcher, token):
            refused.append(step)
            break
    return {"masks": torch.stack(masks), "counts": counts, "refused_steps": sorted(set(refused))}


def run_batch1(lib: Library, compiled: Any, seq: list[int], documents: int) -> dict:
    """`documents` passes over seq, each with a fresh matcher: fill and advance timed per token."""
    bitmask = torch.full((1, WORDS), -1, dtype=torch.int32)
    fill_ns, advance_ns, per_step = [], [], [[] for _ in seq]
    clock = time.perf_counter_ns
    for _ in range(documents):
        matcher = lib.matcher(compiled)
        for step, token in enumerate(seq):
            t0 = clock()
            lib.fill(matcher, bitmask, 0)
            t1 = clock()
            lib.advance(matcher, token)
            t2 = clock()
            fill_ns.append(t1 - t0)
            advance_ns.append(t2 - t1)
            per_step[step].append(t2 - t0)
    return {"fill": fill_ns, "advance": advance_ns, "per_step": per_step}


def run_rows(lib: Library, compiled: Any, seq: list[int], steps: int, batched: bool) -> dict:
    """ROWS matchers staggered through seq (row r starts r/ROWS of the way in; a row that has taken
    eos starts again with a fresh matcher, untimed): each step fills all rows, then advances all."""
    n = len(seq)
    offsets = [r * n // ROWS for r in range(ROWS)]
    matchers = [lib.matcher(compiled) for _ in range(ROWS)]
    for matcher, offset in zip(matchers, offsets):
        for token in seq[:offset]:
            lib.advance(matcher, token)
    position = list(offsets)
    bitmask = torch.full((ROWS, WORDS), -1, dtype=torch.int32)
    fill_ns, advance_ns, refused = [], [], 0
    clock = time.perf_counter_ns
    for _ in range(steps):
        tokens = [seq[p] for p in position]
        t0 = clock()
        if batched:
            lib.batch_fill(matchers, bitmask)
        else:
            for row, matcher in enumerate(matchers):
                lib.fill(matcher, bitmask, row)
        t1 = clock()
        if batched:
            lib.batch_advance(matchers, tokens)
        else:
            for matcher, token in zip(matchers, tokens):
                lib.advance(matcher, token)
        t2 = clock()
        fill_ns.append(t1 - t0)
        advance_ns.append(t2 - t1)
        refused += sum(not has(bitmask, row, token) for row, token in enumerate(tokens))
        for row in range(ROWS):
            position[row] += 1
            if position[row] == n:
                matchers[row], position[row] = lib.matcher(compiled), 0
    return {"fill": fill_ns, "advance": advance_ns, "refused": refused}


def run_sliceserve_rows(compiled: Any, seq: list[int], steps: int) -> dict | None:
    """sliceserve's own path (xgrammar): engine.grammar.grammar_bitmask over ROWS GrammarStates each
    step (a new bitmask, each state synced with its output, then filled), staggered as in run_rows."""
    try:
        from sliceserve.engine.grammar import GrammarState, grammar_bitmask
    except ImportError:
        return None
    n = len(seq)
    position = [r * n // ROWS for r in range(ROWS)]
    states = [GrammarState(compiled, STOP) for _ in range(ROWS)]
    outputs = [list(seq[:p]) for p in position]
    for state, output in zip(states, outputs):
        state.sync(output)
    step_ns, refused = [], 0
    clock = time.perf_counter_ns
    for _ in range(steps):
        t0 = clock()
        bitmask = grammar_bitmask(states, outputs, VOCAB)
        step_ns.append(clock() - t0)
        for row in range(ROWS):
            token = seq[position[row]]
            refused += not has(bitmask, row, token)
            outputs[row].append(token)
            position[row] += 1
            if position[row] == n:
                states[row], outputs[row], position[row] = GrammarState(compiled, STOP), [], 0
    return {"step": step_ns, "refused": refused}


def mask_apply(rounds: int) -> list[dict]:
    """Applying a bitmask to (rows, VOCAB) float32 logits, the ways sliceserve can, with 1 and 2 torch
    threads, for two masks: 3 tokens allowed (a key or punctuation) and all but 32 allowed (inside a
    string). Each call at most 200 times a round, or 0.5 s."""
    try:
        from sliceserve.engine.grammar import masked_by_grammar, masked_by_grammar_reference
    except ImportError:
        masked_by_grammar, masked_by_grammar_reference = None, None
    generator = torch.Generator().manual_seed(0)
    few = torch.zeros(WORDS, dtype=torch.int32)
    few[5] = 0b1011
    many = torch.full((WORDS,), -1, dtype=torch.int32)
    many[0] = 0
    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        "torch: unpack bits + masked_fill (masked_by_grammar_reference)": masked_by_grammar_reference
        or (lambda s, b: s.masked_fill(~allowed(b), float("-inf"))),
        "scores.clone() alone (what masked_by_grammar adds to the kernel)": lambda s, b: s.clone(),
    }
    try:
        import xgrammar

        methods["xgrammar.apply_token_bitmask_inplace, cpu kernel (in place)"] = lambda s, b: (
            xgrammar.apply_token_bitmask_inplace(s, b, vocab_size=VOCAB)
        )
        if masked_by_grammar is not None:
            methods["sliceserve masked_by_grammar (clone + xgrammar cpu kernel)"] = masked_by_grammar
    except ImportError:
        pass
    found, threads = [], torch.get_num_threads()
    for torch_threads in (1, THREADS):
        torch.set_num_threads(torch_threads)
        for (rows, pattern), label in itertools.product(((1, few), (1, many), (16, few), (16, many)), methods):
            fn = methods[label]
            scores = torch.randn(rows, VOCAB, generator=generator)
            bitmask = pattern.expand(rows, WORDS).contiguous()
            samples = []
            for _ in range(rounds):
                for _ in range(5):
                    fn(scores.clone(), bitmask)  # warm
                start = time.perf_counter()
                for _ in range(200):
                    target = scores.clone()
                    t0 = time.perf_counter_ns()
                    fn(target, bitmask)
                    samples.append(time.perf_counter_ns() - t0)
                    if time.perf_counter() - start > 0.5:
                        break
            allowed_now = "3 allowed" if pattern is few else "all but 32 allowed"
            found.append(
                {
                    "torch_threads": torch_threads,
                    "rows": rows,
                    "mask": allowed_now,
                    "method": label,
                    **stats_us(samples),
                }
            )
    torch.set_num_threads(threads)
    return found


# --- comparing masks ---------------------------------------------------------------------------------


def compare_masks(checks: dict[str, dict], tokenizer: Any) -> list[dict]:
    """Per pair of libraries: the steps at which their masks are identical, and the tokens one
    allows and the other refuses, also leaving the special tokens (added, special) out."""
    special = torch.zeros(VOCAB, dtype=torch.bool)
    special[sorted({i for i, t in tokenizer.added_tokens_decoder.items() if t.special} - set(STOP))] = True
    names = [n for n in checks if "masks" in checks[n]]
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            steps = min(len(checks[a]["masks"]), len(checks[b]["masks"]))
            ma, mb = checks[a]["masks"][:steps], checks[b]["masks"][:steps]
            entry: dict[str, Any] = {"a": a, "b": b, "steps": steps}
            for key, keep in (("all", torch.ones(VOCAB, dtype=torch.bool)), ("ordinary", ~special)):
                only_a = (ma & ~mb & keep).sum(1)
                only_b = (mb & ~ma & keep).sum(1)
                worst = int((only_a + only_b).argmax())
                examples_a = torch.nonzero(ma[worst] & ~mb[worst] & keep).flatten()[:6].tolist()
                examples_b = torch.nonzero(mb[worst] & ~ma[worst] & keep).flatten()[:6].tolist()
                entry[key] = {
                    "identical_steps": int(((only_a + only_b) == 0).sum()),
                    "max_only_a": int(only_a.max()),
                    "max_only_b": int(only_b.max()),
                    "worst_step": worst,
                    "worst_only_a_examples": tokenizer.convert_ids_to_tokens(examples_a),
                    "worst_only_b_examples": tokenizer.convert_ids_to_tokens(examples_b),
                }
            entry["special_tokens_only_a_steps"] = int((ma & ~mb & special).any(1).sum())
            entry["special_tokens_only_b_steps"] = int((mb & ~ma & special).any(1).sum())
            pairs.append(entry)
    return pairs


# --- the run -----------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="grammar_overhead_cpu")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the libraries")
    parser.add_argument("--documents", type=int, default=20, help="batch-1 passes over the document per round")
    parser.add_argument("--libraries", default="xgrammar,llguidance,outlines-core")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    assert len(tokenizer) == VOCAB, len(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    seq = [*ids, STOP[0]]  # the document, then eos

    wanted = [c for c in LIBRARIES if c.name in args.libraries.split(",")]
    libs: dict[str, Library] = {}
    results: dict[str, dict] = {}
    compiled: dict[tuple[str, str], Any] = {}
    for cls in wanted:
        lib = cls()
        entry: dict[str, Any] = {"version": package_version(cls.package), "mask_format": cls.mask_format}
        results[cls.name] = entry
        if entry["version"] is None:
            entry["skipped"] = f"{cls.package} is not installed"
            continue
        try:
            gc.collect()
            t0 = time.perf_counter()
            lib.setup()
            entry["import_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            t0 = time.perf_counter()
            lib.build_table(tokenizer)
            entry["tokenizer_setup_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            entry["compile"] = {}
            for gname, schema in GRAMMARS.items():
                result, times = timed(lambda s=schema: lib.compile(s), repeats=5, budget_s=20)
                compiled[cls.name, gname] = result
                _, make = timed(lambda r=result: lib.matcher(r), repeats=20, budget_s=5)
                entry["compile"][gname] = {
                    "compile_ms_median": round(statistics.median(times), 2),
                    "compile_ms_all": [round(t, 2) for t in times],
                    "matcher_us_median": round(statistics.median(make) * 1e3, 1),
                }
            libs[cls.name] = lib
        except Exception as error:  # a library that fails is reported, not fatal
            entry["skipped"] = f"failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
            entry["traceback"] = traceback.format_exc(limit=3)

    checks: dict[str, dict[str, dict]] = {g: {} for g in GRAMMARS}
    for name, lib in list(libs.items()):
        for gname in GRAMMARS:
            try:
                checks[gname][name] = check_pass(lib, compiled[name, gname], seq)
            except Exception as error:
                checks[gname][name] = {"error": f"{type(error).__name__}: {error}"}

    # timing: interleaved rounds, samples pooled
    samples: dict[tuple[str, str, str], dict[str, list]] = {}
    steps16 = 2 * len(seq)  # each round: every row sees each position of the document twice
    for _ in range(args.rounds):
        for name, lib in libs.items():
            for gname in GRAMMARS:
                c = compiled[name, gname]
                run_batch1(lib, c, seq, 1)  # warm
                b1 = run_batch1(lib, c, seq, args.documents)
                modes = {"batch1": b1, f"rows{ROWS}_sequential": run_rows(lib, c, seq, steps16, batched=False)}
                if lib.batched:
                    modes[f"rows{ROWS}_batched"] = run_rows(lib, c, seq, steps16, batched=True)
                if name == "xgrammar":
                    ours = run_sliceserve_rows(c, seq, steps16)
                    if ours is not None:
                        modes[f"rows{ROWS}_sliceserve_grammar_bitmask"] = ours
                for mode, data in modes.items():
                    pool = samples.setdefault((name, gname, mode), {})
                    for key, values in data.items():
                        if key == "per_step":
                            pool.setdefault(key, [[] for _ in values])
                            for acc, v in zip(pool[key], values):
                                acc.extend(v)
                        elif key == "refused":
                            pool[key] = pool.get(key, 0) + values
                        else:
                            pool.setdefault(key, []).extend(values)
                            pool.setdefault(key + "_round_medians", []).append(statistics.median(values) / 1e3)

    for (name, gname, mode), pool in samples.items():
        per = results[name].setdefault("per_token", {}).setdefault(gname, {})
        row: dict[str, Any] = {}
        if "fill" in pool:
            total = [f + a for f, a in zip(pool["fill"], pool["advance"])]
            row = {"fill": stats_us(pool["fill"]), "advance": stats_us(pool["advance"]), "total": stats_us(total)}
            row["total_round_medians_us"] = [
                round(f + a, 2) for f, a in zip(pool["fill_round_medians"], pool["advance_round_medians"])
            ]
        else:
            row = {"total": stats_us(pool["step"])}
        if "per_step" in pool:
            row["per_step_median_us"] = [round(statistics.median(v) / 1e3, 1) for v in pool["per_step"]]
        if "refused" in pool:
            row["refused_tokens"] = pool["refused"]
        per[mode] = row

    for gname, by_lib in checks.items():
        for name, check in by_lib.items():
            results[name].setdefault("correctness", {})[gname] = (
                {"error": check["error"]}
                if "error" in check
                else {
                    "steps": len(check["counts"]),
                    "refused_steps": check["refused_steps"],
                    "allowed_counts": check["counts"],
                }
            )

    apply_rows = mask_apply(min(args.rounds, 3))
    load_end = os.getloadavg()
    data = {
        "conditions": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_end],
            "platform": platform.platform(),
            "versions": {
                **versions(),
                **{c.package: package_version(c.package) for c in LIBRARIES},
                "tokenizers": package_version("tokenizers"),
            },
            "tokenizer": {"path": str(TOKENIZER.relative_to(ROOT)), "model": "SmolLM2-135M-Instruct", "vocab": VOCAB},
            "stop_tokens": list(STOP),
            "rows": ROWS,
            "threads_for_batched_calls": THREADS,
            "rounds": args.rounds,
            "documents_per_round_batch1": args.documents,
            "steps_per_round_rows": steps16,
        },
        "schema": SCHEMA,
        "document": TEXT,
        "document_tokens": len(ids),
        "sequence": seq,
        "libraries": results,
        "mask_agreement": {g: compare_masks(checks[g], tokenizer) for g in GRAMMARS},
        "mask_apply": apply_rows,
    }
    write_json(args.out_dir / f"{args.name}.json", data)
    (args.out_dir / f"{args.name}.md").write_text(markdown(data, tokenizer))
    print((args.out_dir / f"{args.name}.md").read_text())


# --- the report --------------------------------------------------------------------------------------


def markdown(data: dict, tokenizer: Any) -> str:
    c = data["conditions"]
    libs = data["libraries"]
    ok = [n for n, e in libs.items() if "skipped" not in e]
    v = c["versions"]
    out = [
        "# Structured output overhead on the CPU: xgrammar, llguidance, outlines-core",
        "",
        "`python benchmarks/grammar_overhead.py --out-dir benchmarks/results` "
        f"({c['date']}; {c['cpu']}, {c['cores']} cores, torch threads {c['torch_threads']}; "
        f"load average {c['load_average_start'][0]:.2f} at the start, {c['load_average_end'][0]:.2f} at the end, "
        "with a CI run beside it, so timings are noisy; "
        f"torch {v['torch']}, transformers {v['transformers']}, tokenizers {v['tokenizers']}, "
        f"Python {v['python']}).",
        "",
        f"Tokenizer: {c['tokenizer']['model']} ({c['tokenizer']['path']}, {c['tokenizer']['vocab']:,} tokens); "
        f"eos {c['stop_tokens']}. Document ({data['document_tokens']} tokens + eos, the same ids for every library):",
        "",
        f"    {data['document']}",
        "",
        f'Schema (json_schema): `{json.dumps(data["schema"])}`. json_object is `{{"type": "object"}}`.',
        "",
        "## Libraries",
        "",
        "| library | version | import ms | token table ms | mask it produces |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, e in libs.items():
        if "skipped" in e:
            out.append(f"| {name} | {e['version'] or '-'} | | | skipped: {e['skipped']} |")
        else:
            out.append(
                f"| {name} | {e['version']} | {e['import_ms']:.0f} | {e['tokenizer_setup_ms']:.0f} | {e['mask_format']} |"
            )
    out += [
        "",
        "## Compile (median of up to 5, ms) and a matcher per request (median of 20, µs)",
        "",
        "| library | json_object compile ms | json_schema compile ms | json_object matcher µs | json_schema matcher µs |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ok:
        cc = libs[name]["compile"]
        out.append(
            f"| {name} | {cc['json_object']['compile_ms_median']:.2f} | {cc['json_schema']['compile_ms_median']:.2f} "
            f"| {cc['json_object']['matcher_us_median']:.1f} | {cc['json_schema']['matcher_us_median']:.1f} |"
        )
    out += [
        "",
        "xgrammar compiles the token masks ahead (cache cleared before each compile); llguidance's compile is "
        "the grammar plus one matcher (it computes masks lazily, during decoding, so its first steps pay); "
        "outlines-core builds the whole token-level DFA index from a regex (json_object: nesting bounded at 3).",
        "",
        "## Per token: fill the mask + advance the matcher (µs)",
        "",
        f"batch 1: one matcher, {c['documents_per_round_batch1']} fresh-matcher passes over the document per round; "
        f"{c['rows']} rows: {c['rows']} matchers staggered through the document, one step = fill every row then "
        f"advance every row ({c['steps_per_round_rows']} steps per round), times per step for all {c['rows']} rows; "
        f"{c['rounds']} interleaved rounds pooled. Batched calls use {c['threads_for_batched_calls']} threads. "
        "With more runnable threads than cores, p99 is mostly the scheduler's time slice (a few ms), not the library; "
        "compare medians.",
        "",
        "| grammar | library | mode | fill median | fill p99 | advance median | advance p99 | total median | total p99 | "
        "first step (median) | round medians (total) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for gname in GRAMMARS:
        for name in ok:
            for mode, r in libs[name].get("per_token", {}).get(gname, {}).items():
                if "fill" in r:
                    out.append(
                        f"| {gname} | {name} | {mode} | {r['fill']['median_us']:.1f} | {r['fill']['p99_us']:.1f} "
                        f"| {r['advance']['median_us']:.1f} | {r['advance']['p99_us']:.1f} "
                        f"| **{r['total']['median_us']:.1f}** | {r['total']['p99_us']:.1f} "
                        f"| {r['per_step_median_us'][0] if 'per_step_median_us' in r else ''} "
                        f"| {', '.join(f'{x:.1f}' for x in r['total_round_medians_us'])} |"
                    )
                else:
                    out.append(
                        f"| {gname} | {name} | {mode} (sync + fill, new bitmask) | | | | "
                        f"| **{r['total']['median_us']:.1f}** | {r['total']['p99_us']:.1f} | | |"
                    )
    out += ["", "## Correctness and agreement of the masks", ""]
    for gname in GRAMMARS:
        for name in ok:
            corr = libs[name].get("correctness", {}).get(gname, {})
            refused_rows = {
                mode: r.get("refused_tokens", 0) for mode, r in libs[name].get("per_token", {}).get(gname, {}).items()
            }
            if "error" in corr:
                out.append(f"- {gname}, {name}: error {corr['error']}")
            else:
                out.append(
                    f"- {gname}, {name}: {corr['steps']} steps, the document's token refused at "
                    f"{corr['refused_steps'] or 'no step'}; in the timed runs refused {sum(refused_rows.values())} times"
                )
    seq = data["sequence"]
    picks = sorted({0, 1, 3, 5, 8, len(seq) // 3, len(seq) // 2, 2 * len(seq) // 3, len(seq) - 2, len(seq) - 1})
    out += [
        "",
        "Allowed tokens at some steps (text so far -> next token):",
        "",
        "| step | text so far (tail) | next | " + " | ".join(f"{g} {n}" for g in GRAMMARS for n in ok) + " |",
        "| ---: | --- | --- | " + " | ".join("---:" for _ in GRAMMARS for _ in ok) + " |",
    ]
    for step in picks:
        tail = tokenizer.decode(seq[:step])[-24:].replace("|", "\\|")
        nxt = tokenizer.convert_ids_to_tokens(seq[step]).replace("|", "\\|")
        counts = []
        for g in GRAMMARS:
            for n in ok:
                corr = libs[n].get("correctness", {}).get(g, {})
                counts.append(str(corr["allowed_counts"][step]) if "allowed_counts" in corr else "-")
        out.append(f"| {step} | `{tail}` | `{nxt}` | " + " | ".join(counts) + " |")
    out += [
        "",
        "Mask differences over all steps (tokens one allows and the other refuses; then leaving out the "
        "special tokens, ids 0-16 but eos):",
        "",
    ]
    for gname, pairs in data["mask_agreement"].items():
        for p in pairs:
            for key in ("all", "ordinary"):
                q = p[key]
                out.append(
                    f"- {gname}, {p['a']} vs {p['b']} ({key} tokens): identical at {q['identical_steps']}/{p['steps']} "
                    f"steps; at most {q['max_only_a']} only {p['a']}, {q['max_only_b']} only {p['b']}; worst step "
                    f"{q['worst_step']} (only {p['a']}: {q['worst_only_a_examples']}, only {p['b']}: "
                    f"{q['worst_only_b_examples']})"
                )
            out.append(
                f"  - special tokens allowed by {p['a']} only at {p['special_tokens_only_a_steps']} steps, "
                f"by {p['b']} only at {p['special_tokens_only_b_steps']} steps"
            )
    out += [
        "",
        "## Applying the mask to (rows, 49,152) float32 logits (µs, median / p99)",
        "",
        "All three produce the same packed int32 bitmask, so this cost does not depend on the library.",
        "",
        "| torch threads | rows | mask | method | median | p99 |",
        "| ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for r in data["mask_apply"]:
        out.append(
            f"| {r['torch_threads']} | {r['rows']} | {r['mask']} | {r['method']} | {r['median_us']:.1f} | {r['p99_us']:.1f} |"
        )
    out += ["", "## Conclusion", "", conclusion(data), ""]
    return "\n".join(out)


def conclusion(data: dict) -> str:
    """Which library costs least per token here, by how much, and whether xgrammar stands."""
    libs = {n: e for n, e in data["libraries"].items() if "per_token" in e}
    if not libs:
        return "No library could be measured."
    lines, verdicts = [], []
    for gname in GRAMMARS:
        best: dict[str, dict[str, float]] = {}
        for name, e in libs.items():
            modes = e["per_token"].get(gname, {})
            rows = {
                k: m["total"]["median_us"] for k, m in modes.items() if k.startswith(f"rows{ROWS}_") and "fill" in m
            }
            if "batch1" in modes and rows:
                best[name] = {"batch1": modes["batch1"]["total"]["median_us"], "rows": min(rows.values())}
        for key, label in (("batch1", "per token at batch 1"), ("rows", f"per {ROWS}-row step (best mode)")):
            order = sorted(best, key=lambda n: best[n][key])
            ranking = ", ".join(f"{n} {best[n][key]:.1f} µs" for n in order)
            lead = order[0]
            others = [n for n in order if n != lead]
            factor = best[others[0]][key] / best[lead][key] if others else math.nan
            lines.append(
                f"- {gname}, {label}: {ranking}; fastest {lead}"
                + (f", {factor:.2f}x ahead of {others[0]}" if others else "")
                + "."
            )
            if "xgrammar" in best and others:
                verdicts.append(
                    (gname, "batch 1" if key == "batch1" else f"{ROWS} rows", best["xgrammar"][key] / best[lead][key])
                )
    compile_line = []
    for name, e in libs.items():
        cc = e["compile"]
        compile_line.append(
            f"{name} {cc['json_object']['compile_ms_median']:.1f} / {cc['json_schema']['compile_ms_median']:.1f} ms"
        )
    lines.append(f"- Compile (json_object / json_schema): {', '.join(compile_line)}.")
    if verdicts:
        behind = [(g, k, r) for g, k, r in verdicts if r > 1.0]
        xgr_rows = max(
            min(
                m["total"]["median_us"]
                for k, m in libs["xgrammar"]["per_token"].get(g, {}).items()
                if k.startswith(f"rows{ROWS}_") and "fill" in m
            )
            for g in GRAMMARS
        )
        text = (
            "xgrammar is the fastest in every case measured"
            if not behind
            else "xgrammar is the fastest except " + ", ".join(f"{g} {k} ({r:.2f}x the fastest)" for g, k, r in behind)
        )
        worst = max(r for _, _, r in verdicts)
        stands = worst <= 1.25
        lines += [
            "",
            f"{text}; its fill + advance for {ROWS} rows takes at most {xgr_rows:.0f} µs a step (median, best mode). "
            + (
                f"The choice stands (at most {worst:.2f}x the fastest anywhere; the rule: within 1.25x)."
                if stands
                else "Another library is clearly faster somewhere: see the table before keeping xgrammar."
            ),
        ]
    apply = {
        (r["torch_threads"], r["rows"], r["mask"], r["method"].split(":")[0].split(",")[0]): r["median_us"]
        for r in data["mask_apply"]
    }
    kernel = "xgrammar.apply_token_bitmask_inplace"
    if (1, ROWS, "3 allowed", kernel) in apply:
        lines += [
            "",
            f"Applying the mask on this CPU ({ROWS} rows, 1 torch thread, medians): xgrammar's CPU kernel "
            f"{apply[1, ROWS, '3 allowed', kernel]:.0f} µs when 3 tokens are allowed, "
            f"{apply[1, ROWS, 'all but 32 allowed', kernel]:.0f} µs when all but 32 are; torch's unpack + masked_fill "
            f"{apply[1, ROWS, '3 allowed', 'torch']:.0f} / {apply[1, ROWS, 'all but 32 allowed', 'torch']:.0f} µs. "
            "The kernel's cost grows with the refused tokens, so at keys and punctuation it costs more than "
            "computing the masks; the same for every library (one bitmask layout). With 2 torch threads on these "
            "2 loaded cores, torch ops big enough to run in parallel (the clone, the unpack) took milliseconds "
            "(OpenMP threads waiting for a core): an artefact of the load.",
        ]
    lines += [
        "",
        "On a GPU: the mask computation and the matcher are CPU work in all three libraries (none computes "
        "masks on the device), so the numbers above are what a GPU server pays too, per step on the host. "
        "What differs is only where the mask is applied: the packed (rows, ceil(V/32)) int32 bitmask "
        f"({ROWS} rows x {WORDS} words = {ROWS * WORDS * 4 // 1024} KiB) is uploaded to the device each step "
        "and applied there (xgrammar's CUDA/Triton kernel, llguidance's and outlines-core's torch.compile "
        "kernels, or unpack + masked_fill in torch). The three produce the same bitmask layout, so the upload "
        "and apply cost is the same whichever library fills it. No GPU was available for this run, so that "
        "part was not measured.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
