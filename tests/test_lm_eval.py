"""lm-evaluation-harness on our checkpoints, three ways, with the same numbers.

Local tasks (written in a temporary include path from WikiText-2 test paragraphs, so no data set
is downloaded) run through lm-eval 0.4's `simple_evaluate`:
- `local-completions` against our real HTTP server (token ids, echo + logprobs prompt scoring),
- `sliceserve eval` (our runtime in this process, through the command line's main),
- lm-eval's own `hf` model on the same checkpoint, loaded by Transformers with its modelling code.
Word and byte perplexity of a rolling-window task, the accuracy and every choice's log-likelihood
of a multiple-choice task, and the greedy texts of a generation task agree to 1e-4 relative.

Windows: lm-eval's API model keeps one position for a generated token (its max_length - 1) and
rolls windows of one less again, where HFLM rolls windows of max_length. Our server can score
1024 positions, so the API model gets max_length 1024 and rolls windows of 1022; HFLM and ours
get max_length 1022, and one paragraph is longer than that, so every path rolls two windows.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from cli_support import assert_one_line_error, run_sliceserve
from server_support import MAX_POSITIONS, checkpoint_path, start_server

from sliceserve.engine.loading import load_engine
from sliceserve.slicing.calibration import find_wikitext2

MODEL = "tiny-sliced"
WINDOW = MAX_POSITIONS - 2  # what the API model scores at once when told MAX_POSITIONS
ROLLING, CHOICE, GENERATION = "wiki_rolling", "wiki_next_words", "wiki_greedy"
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


def wikitext_paragraphs() -> list[str]:
    """Test-split paragraphs in plain ASCII: the tiny tokenizer's alphabet."""
    lines = (find_wikitext2() / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    paragraphs = [line.strip() for line in lines if not line.strip().startswith("=") and line.isascii()]
    return [p for p in paragraphs if len(p.split()) >= 20]


def write_tasks(folder: Path) -> Path:
    """Three task files and their JSON-lines data in `folder`: rolling perplexity over six
    paragraphs, which of four 6-word continuations follows a 12-word context (8 questions), and
    greedy continuations of 10-word contexts up to a full stop or a newline."""
    paragraphs = wikitext_paragraphs()
    documents = paragraphs[:6]
    questions = []
    for i in range(8):
        words = [p.split() for p in paragraphs[6 + i : 6 + i + 4]]  # this one, then three others
        choices = [" ".join(w[12:18]) for w in words]
        label = i % 4  # the right answer moves around
        choices.insert(label, choices.pop(0))
        questions.append({"context": " ".join(words[0][:12]), "choices": choices, "label": label})
    prompts = [{"context": " ".join(p.split()[:10]), "target": ""} for p in paragraphs[20:24]]
    data = {ROLLING: [{"page": d} for d in documents], CHOICE: questions, GENERATION: prompts}
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = folder / "datasets-cache"  # the datasets library's cache of these files, not ~/.cache
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{path}}\n  cache_dir: {cache}\n"
        "test_split: test\n"
    )
    specific = {
        ROLLING: 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{page}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        CHOICE: 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        GENERATION: 'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    }
    for name, body in specific.items():
        path = folder / f"{name}.jsonl"
        (folder / f"{name}.yaml").write_text(f"task: {name}\n" + common.format(path=path) + body)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return checkpoint_path(tmp_path_factory)


@pytest.fixture(scope="module")
def include_path(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def task_manager(include_path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path), include_defaults=False)


def evaluate(model: str, model_args: dict, task_manager, **settings) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[ROLLING, CHOICE, GENERATION],
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
        **settings,
    )


@pytest.fixture(scope="module")
def through_server(checkpoint, task_manager) -> dict:
    engine = load_engine(checkpoint, max_batch=4, max_model_len=MAX_POSITIONS)
    with start_server(engine, model_name=MODEL) as server:
        model_args = {
            "model": MODEL,
            "base_url": server.base_url + "/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(checkpoint),
            "trust_remote_code": True,  # the tokenizer's config.json names our modelling code
            "tokenized_requests": True,
            "max_length": MAX_POSITIONS,
            "max_retries": 1,
        }
        return evaluate("local-completions", model_args, task_manager)


@pytest.fixture(scope="module")
def sliceserve_eval(checkpoint, include_path, tmp_path_factory) -> tuple[dict, str]:
    """`sliceserve eval` through the command line's main, in this process: its JSON and what it printed."""
    from sliceserve.cli import main

    out = tmp_path_factory.mktemp("sliceserve_eval") / "results.json"
    tasks = f"{ROLLING},{CHOICE},{GENERATION}"
    arguments = ["eval", str(checkpoint), "--tasks", tasks, "--include-path", str(include_path)]
    arguments += ["--max-length", str(WINDOW), "--batch-size", "4", "--bootstrap-iters", "0"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*arguments, "--out", str(out), "--log-samples"]) == 0
    return json.loads(out.read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def through_sliceserve(sliceserve_eval) -> dict:
    return sliceserve_eval[0]


@pytest.fixture(scope="module")
def through_transformers(checkpoint, task_manager) -> dict:
    model_args = {"pretrained": str(checkpoint), "trust_remote_code": True, "dtype": "float32", "max_length": WINDOW}
    return evaluate("hf", model_args, task_manager, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def runs(through_server, through_sliceserve, through_transformers) -> dict[str, dict]:
    return {"server": through_server, "sliceserve": through_sliceserve, "hf": through_transformers}


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b))


def per_document(results: dict, task: str) -> list:
    """Each document's responses (lm-eval's filtered_resps), in document order."""
    return [sample["filtered_resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_the_long_paragraph_rolls_over_two_windows(checkpoint):
    from sliceserve.model.loader import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    lengths = [len(tokenizer.encode(text)) for text in wikitext_paragraphs()[:6]]
    assert max(lengths) > WINDOW > min(lengths)


def test_rolling_perplexity_agrees(runs):
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        values = {path: results["results"][ROLLING][metric] for path, results in runs.items()}
        assert all(math.isfinite(v) and v > 0 for v in values.values()), values
        assert relative_gap(values["server"], values["sliceserve"]) < TOLERANCE, (metric, values)
        assert relative_gap(values["hf"], values["sliceserve"]) < TOLERANCE, (metric, values)
    documents = {path: per_document(results, ROLLING) for path, results in runs.items()}
    for ours, server, hf in zip(documents["sliceserve"], documents["server"], documents["hf"]):
        assert relative_gap(float(ours[0]), float(server[0])) < TOLERANCE
        assert relative_gap(float(ours[0]), float(hf[0])) < TOLERANCE


def test_multiple_choice_agrees(runs):
    accuracies = {path: results["results"][CHOICE]["acc,none"] for path, results in runs.items()}
    assert len(set(accuracies.values())) == 1, accuracies
    assert len(set(r["results"][CHOICE]["acc_norm,none"] for r in runs.values())) == 1
    choices = {path: [c for doc in per_document(results, CHOICE) for c in doc] for path, results in runs.items()}
    assert len(choices["sliceserve"]) == 8 * 4
    for ours, server, hf in zip(choices["sliceserve"], choices["server"], choices["hf"]):
        assert relative_gap(float(ours[0]), float(server[0])) < TOLERANCE
        assert relative_gap(float(ours[0]), float(hf[0])) < TOLERANCE
    total = {path: sum(float(c[0]) for c in values) for path, values in choices.items()}
    assert relative_gap(total["sliceserve"], total["server"]) < TOLERANCE
    assert relative_gap(total["sliceserve"], total["hf"]) < TOLERANCE


def test_greedy_generation_agrees(runs):
    texts = {path: [doc[0] for doc in per_document(results, GENERATION)] for path, results in runs.items()}
    assert texts["sliceserve"] == texts["server"] == texts["hf"]
    assert any(texts["sliceserve"])
    assert not any("\n" in text or "." in text for text in texts["sliceserve"])


def test_results_name_what_ran(sliceserve_eval):
    results, printed = sliceserve_eval
    config = results["config"]
    assert config["runtime"] == "reference" and config["device"] == "cpu"
    assert config["max_length"] == WINDOW and config["batch_size"] == 4
    assert config["versions"]["lm_eval"] == lm_eval.__version__
    table = [line for line in printed.splitlines() if line.startswith("|")]
    for task, metric in ((ROLLING, "word_perplexity"), (CHOICE, "acc"), (GENERATION, "exact_match")):
        assert any(task in line for line in table) and any(metric in line for line in table), printed


def test_an_unreachable_data_set_is_one_line(checkpoint, tmp_path):
    """piqa lives on the Hugging Face Hub; run_sliceserve runs offline (HF_HUB_OFFLINE=1)."""
    result = run_sliceserve("eval", checkpoint, "--tasks", "piqa", cwd=tmp_path)
    assert_one_line_error(result, "piqa", "data set", "baber/piqa")


def test_eval_help_loads_no_heavy_library():
    """`sliceserve eval --help` builds the parser only: lm-eval is not imported (nor is Transformers;
    torch for every command is test_first_run.py's)."""
    code = (
        "import sys\n"
        "from sliceserve.cli import main\n"
        "try:\n"
        "    main(['eval', '--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0\n"
        "print('heavy:', [m for m in ('transformers', 'lm_eval', 'datasets') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--include-path" in result.stdout and result.stdout.strip().endswith("heavy: []")


def test_the_model_is_registered_in_lm_eval():
    from lm_eval.api.registry import get_model

    from sliceserve.harness.lm import SliceserveLM

    assert get_model("sliceserve") is SliceserveLM
