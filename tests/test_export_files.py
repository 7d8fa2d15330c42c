"""Which files of a merged folder travel beside an ONNX graph (lite_sft.artifacts.copy_model_files, which every
exporter calls), and the per-task export choices read from the task rows."""

import pytest

from lite_sft.artifacts import copy_model_files, is_model_file
from lite_sft.export import ExportError
from lite_sft.export.onnx import check_dtype
from lite_sft.taskspec import TASKS

MERGED = {
    "config.json": "{}", "generation_config.json": "{}", "tokenizer.json": "{}", "tokenizer_config.json": "{}",
    "chat_template.jinja": "{{ x }}", "merges.txt": "a b", "spiece.model": "sp",
    "model.safetensors": "w", "model-00001-of-00002.safetensors": "w", "model-00002-of-00002.safetensors": "w",
    "model.safetensors.index.json": "{}", "pytorch_model.bin": "w", "pytorch_model.bin.index.json": "{}",
}


def test_every_file_but_the_weights_travels_and_replaces_the_exporters_copy(tmp_path):
    merged, out = tmp_path / "merged", tmp_path / "onnx"
    merged.mkdir()
    (merged / "sub").mkdir()  # save_pretrained writes no folders; one here is not copied
    for name, text in MERGED.items():
        (merged / name).write_text(text)
    out.mkdir()
    (out / "tokenizer_config.json").write_text('{"model_max_length": 1}')  # the builder re-saves the tokenizer
    (out / "model.onnx").write_text("graph")
    copy_model_files(merged, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "merges.txt", "spiece.model"])
    assert (out / "tokenizer_config.json").read_text() == "{}"  # the run's, not the exporter's


@pytest.mark.parametrize("name, graph", [("model.onnx", True), ("model.onnx_data", True), ("model.onnx.data", True),
                                         ("encoder_model.onnx", True), ("config.json", False)])
def test_model_files_are_the_graphs_and_their_weights(name, graph):
    assert is_model_file(name) is graph


def test_fp16_is_for_the_tasks_whose_row_names_it():
    for spec in TASKS.values():
        check_dtype("fp32", spec.name)
        if "fp16" in spec.onnx_dtypes:
            check_dtype("fp16", spec.name)
        else:
            with pytest.raises(ExportError, match=f"--dtype fp16 exports causal-lm runs only; export this {spec.name}"):
                check_dtype("fp16", spec.name)
    with pytest.raises(ExportError, match="choose one of fp32, fp16"):
        check_dtype("int8", "causal-lm")
