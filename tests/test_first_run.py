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
from test_server_support import checkpoint_path

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
