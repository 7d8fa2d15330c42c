"""What `lite-sft bench` measures in a folder: one Candidate per backend row, loaded by serving's own factory.

    find_backends(Path("exports/qwen"), "auto", threads=4)    # torch-adapter, torch-merged, onnx-fp32, ...

An export OUT offers torch-adapter (base + adapter from the run directory parity.json names), torch-merged
(OUT/merged) and the ONNX variants; a tune run directory torch-adapter and torch-merged (merged in memory); an
ONNX or Hugging Face folder that one backend. A row that is not there is a Candidate with the reason it is
skipped. The ONNX and merged rows are built by serve/backends/factory.py, as `lite-sft serve` builds them; the
adapter rows by lite_sft.model.load_tuned, tune's own loader (see this package's docstring).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lite_sft.artifacts import (ADAPTER_CONFIG, MERGED_DIR, MODEL_CONFIG, ONNX_FILE, PARITY_FILE, is_run_dir,
                                model_task, run_task, variant_folder)
from lite_sft.errors import ModelError, ServeError
from lite_sft.model import load_tuned
from lite_sft.options import BACKENDS
from lite_sft.taskspec import TASKS

from .backends.devices import pick_device
from .backends.factory import open_backend
from .backends.folder import check_tokenizer
from .backends.pytorch import TorchBackend



@dataclass
class Candidate:
    name: str
    source: str
    load: Callable[[], object] | None = None
    skip: str | None = None


def bench_task(path: Path) -> str:
    """The task of what `path` holds (a name in taskspec.TASKS); a tune run directory's from its adapter's peft
    task type."""
    if is_run_dir(path):
        return run_task(path)
    if not any((path / name).is_file() for name in (PARITY_FILE, MODEL_CONFIG)):
        return "causal-lm"  # nothing to read a task from: find_backends says what the folder lacks
    return model_task(path)


def find_backends(path: Path, device: str, threads: int | None, task: str = "causal-lm") -> list[Candidate]:
    path = Path(path)
    if not path.is_dir():
        raise ServeError(f"{path} does not exist or is not a folder")
    gpu = pick_device(device).type == "cuda"
    out: list[Candidate] = []
    encoder = not TASKS[task].generates

    def ort(folder: Path):  # the backends `lite-sft serve` runs, from the same factory
        return open_backend("onnx", folder, task, device, threads)

    def torch_merged(folder: Path):
        return open_backend("torch", folder, task, device, threads)

    def onnx(folder: Path, names=("onnx-fp32", "onnx-fp16")) -> None:
        if not (folder / ONNX_FILE).is_file():
            for name in names:
                out.append(Candidate(name, str(folder), skip=f"not exported (no {folder.name}/{ONNX_FILE})"))
            return
        check_tokenizer(folder)
        fp16 = "float16" in _float_type(folder / ONNX_FILE)
        for name in names:
            if name.endswith("fp16") != fp16 and len(names) > 1:
                out.append(Candidate(name, str(folder), skip=f"not exported (onnx/ is {'fp16' if fp16 else 'fp32'}; "
                                     f"export again with --dtype {name[-4:]})"))
            elif fp16 and not gpu:
                out.append(Candidate(name, str(folder), skip="GPU only: onnxruntime's CPU fp16 kernels are slower than fp32"))
            else:
                out.append(Candidate(name, str(folder), lambda f=folder: ort(f)))

    if (path / PARITY_FILE).is_file():
        run_dir = Path(json.loads((path / PARITY_FILE).read_text()).get("run_dir", ""))
        if encoder:
            out.append(Candidate("torch-adapter", str(run_dir), skip="base + adapter are measured for causal LMs; "
                                 "torch-merged is this classifier's PyTorch row"))
        elif (run_dir / ADAPTER_CONFIG).is_file():
            out.append(Candidate("torch-adapter", str(run_dir), lambda: _adapter_backend(run_dir, device, threads)))
        else:
            out.append(Candidate("torch-adapter", str(run_dir), skip=f"the run directory {run_dir} named in "
                                 "parity.json is not there (bench the run directory itself, or restore it)"))
        merged = path / MERGED_DIR
        out.append(Candidate("torch-merged", str(merged), lambda: torch_merged(merged))
                   if (merged / MODEL_CONFIG).is_file() else Candidate("torch-merged", str(merged), skip="no merged/"))
        onnx(path / variant_folder("fp"))
        onnx(path / variant_folder("int8"), ("onnx-int8",))
        onnx(path / variant_folder("int4"), ("onnx-int4",))
    elif (path / ADAPTER_CONFIG).is_file():
        out.append(Candidate("torch-adapter", str(path), lambda: _adapter_backend(path, device, threads)))
        out.append(Candidate("torch-merged", str(path), lambda: _adapter_backend(path, device, threads, merge=True)))
        for name in BACKENDS[2:]:
            out.append(Candidate(name, str(path), skip=f"a run directory: `lite-sft export {path} --out OUT`, then bench OUT"))
    elif (path / ONNX_FILE).is_file():
        onnx(path, ("onnx-" + ("fp16" if "float16" in _float_type(path / ONNX_FILE) else path.name.split("-")[-1]
                               if path.name.startswith("onnx-") else "fp32"),))
    elif (path / MODEL_CONFIG).is_file():
        check_tokenizer(path)
        out.append(Candidate("torch-merged", str(path), lambda: torch_merged(path)))
    else:
        raise ServeError(f"{path} is not an export OUT, a tune run directory, an ONNX folder or a Hugging Face folder")
    return out


def _float_type(model_file: Path) -> str:
    """The graph's float type, as its KV cache (a decoder) or its logits (a classifier) have it."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    past = next((i for i in graph.input if i.name.startswith("past_key_values")), None)
    if past is None:
        past = next((o for o in graph.output if o.name == "logits"), None)
    return onnx.TensorProto.DataType.Name(past.type.tensor_type.elem_type).lower() if past is not None else ""


def _adapter_backend(run_dir: Path, device: str, threads: int | None, merge: bool = False):
    """Base + adapter as `lite-sft tune` left them, by tune's own loader (loading code, not training code: see
    this package's docstring)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        model, _, cfg = load_tuned(run_dir, pick_device(device))
    except ModelError as err:
        raise ServeError(str(err)) from err
    precision = str(next(model.parameters()).dtype).replace("torch.", "").replace("float", "fp")
    if cfg.model.quant != "none":
        precision += f" ({cfg.model.quant} base)"
    if merge:
        return TorchBackend.from_model(model.merge_and_unload(), "torch-merged", precision)
    return TorchBackend.from_model(model, "torch-adapter", precision)
