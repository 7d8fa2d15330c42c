"""The commands after tuning: `export`, `serve` and `bench` (lite_sft.cli registers them).

    lite-sft export runs/qwen --out exports/qwen --quantize int4
    lite-sft serve exports/qwen
    lite-sft bench exports/qwen

Their options are the fields of ExportOptions, ServeOptions, ServerSettings, BenchOptions and BenchRun
(lite_sft/options.py); export and serving are imported inside each command so that `--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_options import Given, fail, options
from .cli_run import RUN_ERRORS
from .errors import ExportError, ServeError
from .options import BenchOptions, BenchRun, ExportOptions, ExportTarget, ServeOptions, ServerSettings

EXPORT = ("ExportTarget.out", *(f"ExportOptions.{name}" for name in (
    "dtype", "merged_dtype", "quantize", "block_size", "merge_onto", "onnx", "exporter", "parity_prompts",
    "parity_tokens", "parity_examples", "min_agreement", "names", "overwrite")))
SERVE = ("ServeOptions.host", "ServeOptions.port", "ServeOptions.device", "ServeOptions.variant",
         "ServerSettings.api_key", "ServeOptions.model_name", "ServerSettings.max_batch", "ServerSettings.max_queue",
         "ServerSettings.batching", "ServerSettings.timeout_s", "ServerSettings.max_context",
         "ServerSettings.default_max_tokens", "ServeOptions.threads", "ServeOptions.log_level")
BENCH = ("BenchRun.url", "BenchOptions.backends", "BenchOptions.prompt_lens", "BenchOptions.output_lens",
         "BenchOptions.batch_sizes", "BenchOptions.runs", "BenchOptions.warmup", "BenchRun.quick",
         "BenchOptions.device", "BenchOptions.threads", "BenchRun.out", "BenchRun.concurrency", "BenchRun.duration",
         "BenchRun.max_tokens", "BenchRun.min_tokens", "BenchRun.api_key")


RunDirs = Annotated[list[Path], typer.Argument(
    help="A `lite-sft tune` output directory; several of one base: one base graph and an adapter per run.")]


@options(*EXPORT)
def export(run_dir: RunDirs, given: Given):
    """Merge the adapter into its base, export ONNX (optionally int8/int4) and gate each step on parity."""
    out = ExportTarget(**given.of(ExportTarget)).out
    opts = ExportOptions(**given.of(ExportOptions))
    report: dict = {}
    try:
        from lite_sft.export.multi import export_runs
        from lite_sft.export.pipeline import ParityFailed, export_run

        if len(run_dir) > 1:
            report = export_runs(run_dir, out, opts, say=typer.echo)
        elif opts.names:
            raise ExportError(f"--name {opts.names[0]}: names the adapters of several runs exported together; "
                              f"{run_dir[0]} alone exports merged")
        else:
            export_run(run_dir[0], out, opts, say=typer.echo)
    except RUN_ERRORS + (ExportError,) as err:
        fail(err)
    except ParityFailed as err:
        typer.echo(err.text)
        fail(err, code=1)
    if len(run_dir) > 1:
        typer.echo(f"\nexported to {out}: base/ onnx/" + (f" onnx-{opts.quantize}/" if opts.quantize != "none" else "")
                   + (" heads/" if "tasks" in report else "") + " adapters/ adapters.json parity.json")
        return
    typer.echo(f"\nexported to {out}: merged/" + (" onnx/" if opts.onnx else "")
               + (f" onnx-{opts.quantize}/" if opts.quantize != "none" else "") + " parity.json")


@options(*SERVE)
def serve(model_dir: Annotated[Path, typer.Argument(
        help="An export OUT, its onnx/ folder, or a Hugging Face folder (merged/).")], given: Given):
    """Serve an exported model over an OpenAI-compatible HTTP API: /v1/completions and /v1/chat/completions for a
    causal LM, /v1/completions for seq2seq, /v1/classify for seq-cls, /v1/ner for token-cls."""
    try:
        from lite_sft.serve.server import serve as run_server

        # build_server takes ServeOptions' fields and ServerSettings' (but the model name it resolves) as keywords.
        run_server(model_dir, say=typer.echo, **given.of(ServeOptions), **given.of(ServerSettings))
    except ServeError as err:
        fail(err)


@options(*BENCH)
def bench(model_dir: Annotated[Optional[Path], typer.Argument(
        help="An export OUT, a tune run directory, an ONNX or a Hugging Face folder.")] = None, *, given: Given):
    """Latency of every backend side by side (TTFT, TPOT, ITL, tokens/s, memory; an encoder classifier's latency
    per batch and sequences/s), or a load test with --url."""
    import json

    run = BenchRun(**given.of(BenchRun))
    try:
        if run.url:
            from lite_sft.serve.loadtest import format_load, load_test

            report = load_test(run.url, run.concurrency, run.duration, run.max_tokens, api_key=run.api_key,
                               min_tokens=run.min_tokens)
            typer.echo(format_load(report))
            typer.echo(json.dumps(report))
            return
        if model_dir is None:
            fail(ValueError("give MODEL_DIR to benchmark backends, or --url to load-test a running server"))
        from lite_sft.serve.bench import bench as run_bench
        from lite_sft.serve.bench_report import format_table, save

        opts = BenchOptions(**given.of(BenchOptions))
        if run.quick:
            opts.prompt_lens, opts.output_lens, opts.runs, opts.warmup = [16], [32], 5, 1
        report = run_bench(model_dir, opts, say=typer.echo)
    except ServeError as err:
        fail(err)
    typer.echo(format_table(report))
    typer.echo(json.dumps(report))
    saved = save(report, run.out)
    typer.echo(f"saved {saved[0]} and {saved[1]}")
