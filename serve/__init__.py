"""lite_sft.serve: ONNX Runtime inference, an OpenAI-compatible server and latency benchmarks.

    lite-sft serve exports/demo                  # server.py: the app of http/ over a backend of backends/
    lite-sft bench exports/demo --quick          # bench.py: every backend of one model side by side

Installed as `lite_sft.serve` (see pyproject's package-dir). Inside, imports point one way:
    backends/  the models, behind protocol.py's typed calls on token ids (factory.py: a folder -> a backend)
    engine     sampling.py, generate.py (the loop and its Batch) and engine.py (queue, worker, batching), which
               see a backend only through those protocols
    http/      the FastAPI routers with their handler objects, the schemas and the error shape; server.py runs
               them under uvicorn
    bench      bench.py, bench_candidates.py, bench_measure.py, bench_report.py and loadtest.py, on top: they
               build their backends with the same factory as the server

Serving sits above lite-sft's core, tasks, demo and modeling layers and beside nothing: it imports the core
(lite_sft.errors, taskspec, artifacts for the export folder's layout and a model's task, stops for the stop
ids) and, for /v1/ner, lite_sft.tasks.ner and lite_sft.tasks.iob, so a served model reads entities with the
very functions training and `lite-sft eval` scored it with. Bench, given a tune run directory or an export
whose run directory is still there, loads base + adapter with lite_sft.model.load_tuned (modeling, which may
build the built-in demo base with lite_sft.tiny), so the base, its quantisation and the tokenizer's added rows
come back exactly as tune set them up. It never imports training (lite_sft.train, checkpoint, evaluate,
generate) or export code: `lite-sft serve` refuses a tune run directory and names the export to run first.
tests/test_layers.py holds these rules.
"""

from lite_sft.errors import ServeError  # noqa: E402,F401  (the package's error, one tree)
