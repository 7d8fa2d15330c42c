"""lite_sft.serve: ONNX Runtime inference, an OpenAI-compatible server and latency benchmarks.

Installed as `lite_sft.serve` (see pyproject's package-dir). It works on token ids and an exported
model folder and never imports training code.
"""


class ServeError(RuntimeError):
    """A model folder, device or server setting that cannot be used as asked; the message says why."""
