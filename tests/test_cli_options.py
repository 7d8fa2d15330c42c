"""The options every command but tune takes are dataclass fields (lite_sft/options.py): each has a docstring (its
--help), the library and the CLI share their defaults, and the generated flags hand the values back by field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer.main

from lite_sft import options
from lite_sft.cli import app
from lite_sft.cli_options import CLASSES, Given
from lite_sft.config_io import field_docs


@pytest.mark.parametrize("cls", CLASSES.values(), ids=CLASSES)
def test_every_option_field_is_documented(cls):
    docs = field_docs(cls)
    assert {f.name for f in dataclasses.fields(cls)} == set(docs)
    assert all(len(text) > 10 for text in docs.values())


def test_library_defaults_are_the_flags_defaults():
    """The defaults export_run, bench and build_server use when called from Python are the ones --help shows."""
    commands = typer.main.get_command(app).commands
    defaults = {param.opts[0]: param.default for name in ("export", "serve", "bench")
                for param in commands[name].params}
    assert defaults["--merged-dtype"] == options.ExportOptions().merged_dtype == "auto"
    assert defaults["--parity-prompts"] == options.ExportOptions().parity_prompts == 4
    assert defaults["--timeout"] == options.ServerSettings("m").timeout_s == 60.0
    assert defaults["--batching"] == options.ServerSettings("m").batching == "continuous"
    assert defaults["--prompt-lens"] == "32,128" and options.BenchOptions().prompt_lens == [32, 128]
    assert defaults["--out"] == Path("bench-results")


def test_given_values_build_the_options_they_name():
    given = Given({"BenchOptions.prompt_lens": "16, 64", "BenchOptions.backends": "onnx-fp32,onnx-int8",
                   "BenchOptions.runs": 3, "BenchRun.quick": True, "task.text_column": "sentence"})
    assert options.BenchOptions(**given.of(options.BenchOptions)) == options.BenchOptions(
        prompt_lens=[16, 64], backends=["onnx-fp32", "onnx-int8"], runs=3)
    assert given.of(options.BenchRun) == {"quick": True}
    assert given.overrides() == {"task.text_column": "sentence"}
