"""What the command-line tests share: the real `sliceserve` command in a subprocess, the
one-line error it must print, and a tiny Llama folder to run it on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

MAX_POSITIONS = 64


def run_sliceserve(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SLICESERVE_DATA_DIR"}
    # tqdm honours TQDM_DISABLE where a bar leaves `disable` at its default; offline so that
    # Transformers never tries the network for a local folder.
    env.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "sliceserve", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def served_url(process: subprocess.Popen) -> str:
    """The base URL (http://host:port) that a `sliceserve serve` process prints once it listens."""
    found = None
    while found is None and (line := process.stdout.readline()):
        found = re.search(r"serving .* at (http://\S+)/v1", line)
    assert found, f"the server did not start: {process.stderr.read() if process.poll() else ''}"
    return found.group(1)


def run_cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    """`sliceserve ARGS` in this process: (exit code, stdout, stderr)."""
    from sliceserve.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def meaningful_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, less progress bars (they redraw with '\\r')."""
    return [line for line in stderr.split("\n") if line.strip() and "\r" not in line and "%|" not in line]


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode != 0
    lines = meaningful_lines(result.stderr)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("sliceserve: error:"), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    return line


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]
    assert not leftovers, f"staging folders left behind: {leftovers}"


def save_tiny_llama(folder: Path, text: str) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator([text], trainer)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=200,
        max_position_embeddings=MAX_POSITIONS,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
