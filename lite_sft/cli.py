"""The `lite-sft` command line: each command builds a config and calls one library function.

    lite-sft tune                                   # the embedded default: tiny model, bundled data
    lite-sft tune --model Qwen/Qwen2.5-0.5B --data chats.jsonl --quant 4bit --output-dir runs/qwen
    lite-sft inspect-data --data chats.jsonl --model Qwen/Qwen2.5-0.5B
    lite-sft plan --model Qwen/Qwen2.5-0.5B --quant 4bit --max-seq-len 2048 --gpu-memory 8GB
    lite-sft generate runs/qwen --prompt "Write a haiku about autumn"
    lite-sft tune --task seq-cls --model bert-base-uncased --data train.csv --output-dir runs/sentiment
    lite-sft eval runs/sentiment --data dev.csv
    lite-sft export runs/qwen --out exports/qwen --quantize int4
    lite-sft bench exports/qwen
    lite-sft serve exports/qwen

Heavy imports (torch, transformers, peft, bitsandbytes, onnxruntime) happen inside the
commands so that `lite-sft --help` answers at once. The commands live in cli_run.py (a tuning run's)
and cli_deploy.py (export, serve, bench); their options are generated from the fields they set
(cli_options.py). This module is the entry point, `lite_sft.cli:app`, and the command table.
"""

from __future__ import annotations

import typer

from . import cli_deploy, cli_run
from .cli_options import param_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune a language model with LoRA/QLoRA, export it, serve it.")
app.command()(cli_run.tune)
app.command("inspect-data")(cli_run.inspect_data)
app.command()(cli_run.plan)
app.command()(cli_run.generate)
app.command("eval")(cli_run.eval_run)
app.command()(cli_deploy.export)
app.command()(cli_deploy.serve)
app.command()(cli_deploy.bench)

# `tune`'s parameter -> the config field its flag overrides (generated: the flags come from the fields).
FLAG_FIELDS = {param_name(path): path for path in cli_run.TUNE if not path[0].isupper()}


def main() -> None:
    app()


if __name__ == "__main__":
    main()
