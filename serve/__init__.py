"""lite_sft.serve: ONNX Runtime inference, an OpenAI-compatible server and latency benchmarks.

Installed as `lite_sft.serve` (see pyproject's package-dir). It works on token ids and an exported model
folder, and never imports lite_sft's training code (train, data, masking, loss, packing, checkpoint, plan):
`lite-sft serve` refuses a tune run directory and names the export to run first.

One path reaches outside the package: `lite-sft bench` given a tune run directory, or an export whose run
directory is still there, measures base + adapter as tune left them (the torch-adapter row, and torch-merged
merged in memory from a run directory). It loads them with lite_sft.model.load_tuned, which reads the run's
config.yaml with lite_sft.config and its task (head, labels) with lite_sft.tasks (and builds the built-in
base with lite_sft.tiny): the base, its
quantisation and the tokenizer's added rows come back exactly as tune set them up, which a second loader
here could only drift from. Those are loading modules; tests/test_serve_imports.py checks that neither the
serve modules nor that bench path leave a training module imported.

/v1/ner reads entities with lite_sft.tasks.ner's split_words, word_predictions and entity_spans (and checks a
token classifier's labels with lite_sft.tasks.iob), the functions training and `lite-sft eval` read them with,
so a served model finds the very entities it was scored on; tests/test_serve_imports.py checks that path too.
"""

from lite_sft.errors import ServeError  # noqa: E402,F401  (the package's error, one tree)
