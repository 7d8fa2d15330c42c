"""Every command's `--help`, word for word, against the text saved in tests/data/help/ before the options were
generated from the config dataclasses: the flags, their help and their defaults are the interface users and
scripts know, and a generated CLI must not change one of them by accident.

    LITE_SFT_WRITE_HELP=1 pytest tests/test_cli_help.py    # after a deliberate change: save the new texts
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lite_sft.cli import app

HELP = Path(__file__).parent / "data" / "help"
COMMANDS = ("", "tune", "inspect-data", "plan", "generate", "eval", "export", "serve", "bench")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_unchanged(command):
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args, terminal_width=120, env={"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    saved = HELP / f"{command or 'lite-sft'}.txt"
    if os.environ.get("LITE_SFT_WRITE_HELP"):
        saved.write_text(result.output)
    assert result.output == saved.read_text(), f"`lite-sft {command} --help` changed; see {saved}"
