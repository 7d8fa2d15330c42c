"""lite_sft.export: merge a tuned adapter into its base and export ONNX with a parity gate.

Installed as `lite_sft.export` (see pyproject's package-dir). It reads what `lite-sft tune` writes
(the run directory's config.yaml, adapter and tokenizer) and never imports the training loop.
"""

from lite_sft.errors import ExportError  # noqa: E402,F401  (the package's error, one tree)
