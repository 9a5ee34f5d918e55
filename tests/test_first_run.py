"""What a new user meets first: a port already in use is one line before anything is loaded or
sliced (the demo once sliced for minutes, then died in a 48-line traceback), and the options of
`demo` and `ppl` say what they do."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import assert_one_line_error, run_sliceserve
from server_support import checkpoint_path

from sliceserve.cli import build_parser


@pytest.fixture
def busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_serve_on_a_busy_port_is_one_line(tmp_path_factory, tmp_path: Path, busy_port: int):
    checkpoint = checkpoint_path(tmp_path_factory)
    result = run_sliceserve("serve", checkpoint, "--port", str(busy_port), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, f"127.0.0.1:{busy_port}", "in use", "--port")


def test_demo_on_a_busy_port_stops_before_slicing(tmp_path: Path, busy_port: int, monkeypatch):
    monkeypatch.setenv("SLICESERVE_CACHE", str(tmp_path / "cache"))
    started = time.monotonic()
    result = run_sliceserve("demo", "--port", str(busy_port), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, f"127.0.0.1:{busy_port}", "in use")
    assert not (tmp_path / "cache").exists()  # nothing was sliced or cached
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    "command, options",
    [("demo", ["--sparsity", "--port", "--device"]), ("ppl", ["--seqlen", "--data-dir", "--batch-size", "--device"])],
)
def test_options_have_help(command: str, options: list[str]):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    actions = {option: action for action in subparsers.choices[command]._actions for option in action.option_strings}
    for option in options:
        assert actions[option].help, f"{command} {option} has no help"


@pytest.mark.parametrize("command", [[], ["serve"], ["slice"], ["finetune"], ["plan"], ["generate"]])
def test_help_loads_no_heavy_library(command: list[str]):
    """`--help` builds the parser only: no torch, Transformers or Triton (they take seconds to import)."""
    code = (
        "import sys\n"
        "from sliceserve.cli import main\n"
        "try:\n"
        f"    main({command!r} + ['--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'triton', 'numpy') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: sliceserve" in result.stdout and result.stdout.strip().endswith("heavy: []")


def test_the_reference_path_serves_without_triton(tmp_path_factory):
    """On a CPU nothing imports Triton: a checkpoint loads and generates with Triton unimportable
    (`pip install .` does not pull it; only the fast path's kernels need it)."""
    code = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "from sliceserve.engine.loading import load_engine\n"
        "from sliceserve.engine.requests import SamplingParams\n"
        f"engine = load_engine({str(checkpoint_path(tmp_path_factory))!r}, max_batch=2, max_model_len=64)\n"
        "engine.start()\n"
        "events = list(engine.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))\n"
        "engine.shutdown()\n"
        "print('tokens', sum(len(e.token_ids) for e in events), 'triton' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("tokens 3 False")


def test_a_long_silent_call_shows_its_elapsed_time(capsys):
    """The GGUF's dequantizing is one call of a minute or more that reports nothing: a bar counts it."""
    from sliceserve.slicing.sources import elapsed_bar

    with elapsed_bar("dequantizing demo.gguf"):
        time.sleep(1.3)
    shown = capsys.readouterr().err
    assert "dequantizing demo.gguf: 00:01" in shown
