"""lite_sft.serve: ONNX Runtime inference, an OpenAI-compatible server and latency benchmarks.

Installed as `lite_sft.serve` (see pyproject's package-dir). It works on token ids and an exported
model folder and never imports training code.
"""
