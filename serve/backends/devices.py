"""Where a backend runs: the torch device (pick_device) and onnxruntime sessions on the provider a device asks
for, shared by every backend (ort.py's decoder, encoder.py's classifiers, seq2seq.py's encoder-decoders,
pytorch.py's models).

    session = open_session(Path("exports/demo/onnx/model.onnx"), "auto", threads=4)   # CUDA if there is one
    pick_device("auto")                                                               # torch.device("cuda") if any

`auto` takes the CUDA execution provider when onnxruntime has it and torch sees a GPU (the decoder's KV buffers
are torch tensors on that GPU), the CPU provider otherwise; a session that silently fell back to the CPU when
CUDA was asked for is an error, not a slow surprise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lite_sft.errors import ServeError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# onnxruntime's tensor types as torch's, and torch's as the numpy types IO binding is given
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
NP_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ServeError("--device cuda: this torch build sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise ServeError(f"--device {device!r}: choose auto, cpu or cuda")
    return torch.device(device)


def ort_providers(device: str) -> list[str]:
    """onnxruntime's providers for `device`: CUDA first when asked, or with `auto` when onnxruntime has the CUDA
    provider and torch sees a GPU (device buffers are torch tensors); the CPU provider always."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ServeError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    want_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available
                                     and torch.cuda.is_available())
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ServeError(f"--device cuda: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
                         "install onnxruntime-gpu")
    if want_cuda and not torch.cuda.is_available():
        raise ServeError("--device cuda: the KV buffers are CUDA tensors and this torch has no CUDA")
    return (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]


def session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def open_session(model_file: Path, device: str, threads: int | None):
    """An onnxruntime session on the providers ort_providers picks; one clear line when it cannot be had."""
    import onnxruntime as ort

    providers = ort_providers(device)
    try:
        session = ort.InferenceSession(str(model_file), session_options(threads), providers=providers)
    except Exception as err:  # noqa: BLE001  (onnxruntime raises its own Fail / InvalidProtobuf / ... types)
        raise ServeError(f"onnxruntime could not load {model_file}: {str(err).splitlines()[0][:300]}") from err
    check_provider(session.get_providers()[0], providers)
    return session


def check_provider(got: str, asked: list[str]) -> None:
    if asked[0] == "CUDAExecutionProvider" and got != asked[0]:
        raise ServeError(f"--device cuda: onnxruntime fell back to {got} (see its log above for why)")


def onnx_precision(folder: Path, fp16: bool) -> str:
    """int8 / int4 for the quantised variants (their folder says which), else the graph's float type."""
    return {"int8": "int8", "int4": "int4"}.get(folder.name.split("-")[-1], "fp16" if fp16 else "fp32")
