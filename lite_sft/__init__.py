"""lite-sft: LoRA/QLoRA fine-tuning, ONNX export with a parity gate, and ONNX Runtime serving."""

__version__ = "0.1.0"
