"""The README's commands exist: every `lite-sft COMMAND --flag` in its code blocks and inline code is a flag
that command takes (the README once offered `lite-sft tune --threads 1`, which does not exist)."""

import re
from pathlib import Path

import typer.main

from lite_sft.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def invocations(text: str) -> list[tuple[str, list[str], str]]:
    """(command, its --flags, the line) for each `lite-sft COMMAND ...` in fenced blocks and inline code."""
    code = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        code += block.replace("\\\n", " ").splitlines()
    code += re.findall(r"`([^`\n]*lite-sft [^`\n]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found = []
    for line in code:
        line = line.split("#", 1)[0]
        for match in re.finditer(r"lite-sft ([a-z][a-z-]*)((?:\s+[^|;&]*)?)", line):
            found.append((match.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(2)), line.strip()))
    return found


def test_every_flag_the_readme_shows_exists():
    commands = typer.main.get_command(app).commands
    seen = invocations(README.read_text())
    assert len(seen) > 20  # the parse found the examples
    wrong = []
    for command, flags, line in seen:
        if command not in commands:
            if command not in ("COMMAND",):
                wrong.append(f"{line}: no command {command}")
            continue
        known = {opt for param in commands[command].params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
        wrong += [f"{line}: {command} has no {flag}" for flag in flags if flag not in known]
    assert not wrong, "\n".join(wrong)


def test_the_check_catches_a_flag_that_does_not_exist():
    assert invocations("run `lite-sft tune --threads 1` on a busy machine") == [
        ("tune", ["--threads"], "lite-sft tune --threads 1")]
