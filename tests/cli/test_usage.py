"""Bad input to `unroll submit` and `unroll sweep` ends in one `error:` line and exit 2,
before anything is sent (so no server is needed here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.cli.main import main


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, "cannot read"),
        ("list.yaml", "- 1\n- 2\n", "the config must be a mapping"),
        ("empty.yaml", "", "the config must be a mapping"),
        ("broken.yaml", "model: [unclosed\n", "cannot read"),
        ("broken.json", "{nope", "cannot read"),
    ],
)
@pytest.mark.parametrize("command", [["submit"], ["sweep", "--grid", "tbptt.k1=4,8"]])
def test_an_unusable_config_file_is_one_error_line(tmp_path: Path, capsys, command, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    # an unreachable URL: nothing may be sent
    code = main([*command, str(path), "--url", "http://127.0.0.1:1", "--token", "t"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_bad_grid_is_one_error_line(tmp_path: Path, capsys):
    path = tmp_path / "base.yaml"
    path.write_text("model: {cell: lstm}\n")
    code = main(["sweep", str(path), "--grid", "tbptt.k1", "--url", "http://127.0.0.1:1", "--token", "t"])
    assert code == 2 and "expected PATH=V1,V2" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["submit"], ["sweep", "--grid", "tbptt.k1"]])
def test_as_a_module_too(tmp_path: Path, command):
    # `python -m service.cli` (service/cli/__main__.py): a usage error raised by a subcommand's
    # module is the one main catches, an error line and exit 2, never a traceback
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *command, str(path), "--url", "http://127.0.0.1:1", "--token", "t"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
