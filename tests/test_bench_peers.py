"""benchmarks/peers.py: lite-sft and onnxruntime-genai end to end on one tiny export (no venv is made), which export
holds which precision, the comparison and token-agreement arithmetic on made-up cells, the tokenizer llama.cpp's
converter reads, and llama.cpp's separate environment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def peers(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its helpers from beside itself
    import workload

    monkeypatch.setattr(workload, "RESULTS", tmp_path / "results")  # never into the committed results
    (tmp_path / "results").mkdir()
    import peers

    return peers


def cell(engine, precision, batch, decode, ttft):
    return {"engine": engine, "precision": precision, "batch": batch, "artefact": "x", "decode_tok_s": decode,
            "ttft_ms": ttft}


def test_quick_run_serves_one_export_to_lite_sft_and_onnxruntime_genai(peers, tmp_path):
    result = peers.main(["--peers", "genai", "--quick", "--precisions", "fp32,int8", "--batches", "2",
                         "--rounds", "2", "--work-dir", str(tmp_path / "w")])
    cells = result["cells"]
    assert [(c["engine"], c["precision"], c["batch"]) for c in cells] == [
        ("lite-sft", "fp32", 2), ("genai", "fp32", 2), ("lite-sft", "int8", 2), ("genai", "int8", 2)]
    for c in cells:
        assert "error" not in c, c.get("error")
        # 8 new tokens: 7 after the first, per row; a tiny model on one thread makes hundreds a second
        assert 1 < c["decode_tok_s"] < 1e6 and 0 < c["ttft_ms"] < 60_000
        assert c["stats"]["e2e_ms"]["p50"] >= c["ttft_ms"]
        assert "tokens" not in c and c["rounds"] == 2  # tokens compared, not saved
    # Both engines run the folders of the one `--quantize int8` export, whose builder graph carries genai_config.json
    assert [c["artefact"] for c in cells] == ["onnx", "onnx", "onnx-int8", "onnx-int8"]
    work = tmp_path / "w" / "llama-h64-l2-i176-a4-kv2-v512"
    assert (work / "export-int8" / "onnx-int8" / "genai_config.json").is_file()
    # the same graph and onnxruntime: the same greedy tokens
    assert [c["same_tokens"] for c in cells if c["engine"] == "genai"] == [1.0, 1.0]
    assert result["engines"]["lite-sft"]["exporter"] == {"fp32": "builder",
                                                        "int8": "quantize_dynamic over the builder graph"}
    assert [(r["precision"], r["fastest_peer"], r["decode_goal"]) for r in result["comparison"]] == [
        ("fp32", "onnxruntime-genai", 1.2), ("int8", "onnxruntime-genai", 1.2)]
    assert result["workload"]["prompt_len"] == 16
    assert result["engines"]["lite-sft"]["versions"]["onnxruntime"]
    assert result["engines"]["onnxruntime-genai"]["versions"]["onnxruntime_genai"]
    saved = json.loads(next((tmp_path / "results").glob("peers-*.json")).read_text())
    assert saved["command"].startswith("python benchmarks/peers.py --peers genai") and saved["device"]["threads"] == 1
    assert saved["peer_python"] is None and not (tmp_path / "w" / "peer-venv").exists()  # genai needs no venv
    # what llama.cpp would convert: merged/ linked, and the tokenizer convert_hf_to_gguf.py reads (Llama's SPM path)
    source = peers.peer_source(work, work / "export-int8" / "merged")
    assert (source / "tokenizer.model").is_file() and (source / "config.json").resolve().parent.name == "merged"


def test_export_plan_makes_each_export_once(peers):
    assert peers.export_plan(["fp32", "int8", "int4"], "cpu") == {
        "fp32": (["--quantize", "int8"], "fp"), "int8": (["--quantize", "int8"], "int8"),
        "int4": (["--quantize", "int4"], "int4")}
    assert peers.export_plan(["fp32", "int4"], "cpu")["fp32"] == (["--quantize", "int4"], "fp")
    assert peers.export_plan(["fp32"], "cpu") == {"fp32": (["--quantize", "none"], "fp")}
    # CUDA: the builder's fp16 graph, and its int4 (which follows its source onto CUDA) from an export of its own,
    # so that an export refusing int4 costs only the int4 cells
    assert peers.export_plan(["fp16", "int4"], "cuda") == {
        "fp16": (["--dtype", "fp16"], "fp"), "int4": (["--dtype", "fp16", "--quantize", "int4"], "int4")}


def test_an_export_that_fails_costs_only_its_own_cells(peers, tmp_path, monkeypatch):
    for marker in ("base/config.json", "run/adapter_config.json"):  # a model and a run already there
        (tmp_path / marker).parent.mkdir(exist_ok=True)
        (tmp_path / marker).write_text("{}")
    calls = []

    def export(cmd, **_):
        calls.append(cmd[cmd.index("--overwrite") + 1:])
        if "--quantize" in cmd:  # what the CLI says when it refuses an option
            return subprocess.CompletedProcess(cmd, 1, "merging\n", "Error: invalid export options:\n"
                                               "  --quantize int4 starts from the fp32 ONNX graph\n")
        (tmp_path / "export-fp16").mkdir()
        (tmp_path / "export-fp16" / "parity.json").write_text('{"exporter": {"name": "builder"}}')
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(peers.subprocess, "run", export)
    exports = peers.build_model(tmp_path, peers.QUICK, 2, ["fp16", "int4"], "cuda", 1)
    assert calls == [["--dtype", "fp16"], ["--dtype", "fp16", "--quantize", "int4"]]
    assert exports["fp16"] == (tmp_path / "export-fp16", "fp")
    assert exports["int4"] == ("lite-sft export --dtype fp16 --quantize int4 failed: Error: invalid export options: "
                               "--quantize int4 starts from the fp32 ONNX graph")


def test_compare_takes_the_faster_peer_and_the_lower_ttft(peers):
    cells = [cell("lite-sft", "int8", 1, 120.0, 80.0), cell("genai", "int8", 1, 170.0, 160.0),
             cell("llama.cpp", "int8", 1, 200.0, 100.0),
             cell("lite-sft", "fp32", 1, 96.0, 50.0), cell("genai", "fp32", 1, 100.0, 50.0),
             cell("lite-sft", "fp32", 8, 300.0, 50.0), cell("genai", "fp32", 8, 240.0, 60.0),
             {"engine": "llama.cpp", "precision": "fp32", "batch": 8, "artefact": "f32", "error": "boom"},
             cell("lite-sft", "int4", 1, 50.0, 10.0)]  # no peer measured: no comparison row
    rows = peers.compare(cells)
    assert rows == [
        {"precision": "int8", "batch": 1, "fastest_peer": "llama.cpp", "decode_ratio": 0.6, "decode_goal": 0.95,
         "lowest_ttft_peer": "llama.cpp", "ttft_ratio": 0.8, "meets_goal": False},
        # batch 1 asks 0.95x, and a TTFT equal to the peer's is no worse
        {"precision": "fp32", "batch": 1, "fastest_peer": "onnxruntime-genai", "decode_ratio": 0.96,
         "decode_goal": 0.95, "lowest_ttft_peer": "onnxruntime-genai", "ttft_ratio": 1.0, "meets_goal": True},
        {"precision": "fp32", "batch": 8, "fastest_peer": "onnxruntime-genai", "decode_ratio": 1.25,
         "decode_goal": 1.2, "lowest_ttft_peer": "onnxruntime-genai", "ttft_ratio": 0.833, "meets_goal": True}]
    table = peers.format_table(cells, rows)
    assert "decode 0.60x (0.95x), TTFT 0.80x (1.0x)" in table and "error: boom" in table
    assert table.count("decode 1.25x") == 1 and "onnxruntime-genai" in table


def test_rounds_pool_their_runs_and_one_failed_round_fails_the_cell(peers):
    first = {"runs": [[0.1, 0.2, 0.3]], "tokens": [[1, 2, 3]], "versions": {"v": 1}, "wall_s": 1.0}
    second = {"runs": [[0.1, 0.3, 0.5]], "tokens": [[9, 9, 9]], "versions": {"v": 2}, "wall_s": 2.0}
    cell = peers.summarise([first, second], batch=1)
    # decode: 2 tokens after the first in 0.2 s, then in 0.4 s: 10 and 5 tok/s, median 7.5 of the pooled runs
    assert cell["decode_tok_s"] == pytest.approx(7.5) and cell["ttft_ms"] == pytest.approx(100.0) and cell["rounds"] == 2 and cell["wall_s"] == 3.0
    assert cell["tokens"] == [[1, 2, 3]] and cell["versions"] == {"v": 1}
    assert peers.summarise([first, {"error": "boom"}], batch=1) == {"error": "boom"}


def test_agreement_counts_each_row_and_step_against_lite_sft(peers):
    ours = {**cell("lite-sft", "fp32", 2, 1.0, 1.0), "tokens": [[5, 6, 7], [8, 9, 10]]}
    same = {**cell("genai", "fp32", 2, 1.0, 1.0), "tokens": [[5, 6, 7], [8, 9, 10]]}
    off = {**cell("llama.cpp", "fp32", 2, 1.0, 1.0), "tokens": [[5, 6, 1], [8, 2, 3]]}
    other = {**cell("genai", "int8", 2, 1.0, 1.0), "tokens": [[1, 2, 3], [4, 5, 6]]}  # no lite-sft int8 cell
    peers.agree([ours, same, off, other])
    assert same["same_tokens"] == 1.0 and off["same_tokens"] == 0.5 and "same_tokens" not in other
    assert "same_tokens" not in ours


def test_spm_tokenizer_is_a_sentencepiece_model_with_llama_specials(peers, tmp_path):
    from transformers.convert_slow_tokenizer import import_protobuf

    tokenizer = peers.spm_tokenizer(tmp_path)
    proto = import_protobuf().ModelProto()
    proto.ParseFromString((tmp_path / "tokenizer.model").read_bytes())
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"] and proto.trainer_spec.byte_fallback
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == [p.piece for p in proto.pieces].index("<|im_end|>")
    assert tokenizer.decode(tokenizer("the lazy dog", add_special_tokens=False).input_ids) == "the lazy dog"
    assert len(tokenizer) == len(proto.pieces)


def test_llama_cpp_processes_get_only_their_own_python_path(peers, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/lite-sft-only")
    args = peers.argparse.Namespace(threads=1, peer_pythonpath="/opt/peers/site", peer_python="/opt/peers/bin/python")
    peer = peers.peer_env(tmp_path, args)
    assert peer["python"] == "/opt/peers/bin/python" and not peer["made"]
    assert peer["env"]["PYTHONPATH"] == "/opt/peers/site" and peer["env"]["PYTHONNOUSERSITE"] == "1"
    assert "VIRTUAL_ENV" not in peer["env"] and not (tmp_path / "peer-venv").exists()


def test_command_hides_the_work_folder(peers):
    assert peers.command(["--work-dir", "/scratch/x", "--batches", "1"]) == \
        "python benchmarks/peers.py --work-dir WORK --batches 1"
    assert peers.command(["--work-dir=/scratch/x"]) == "python benchmarks/peers.py --work-dir=WORK"


def test_the_venv_holds_llama_cpp_alone_at_lite_sft_versions(peers):
    """onnxruntime-genai runs in lite-sft's interpreter; a second onnxruntime in the venv would be one more
    version to keep equal. What the venv shares with lite-sft (transformers, torch) is pinned as lite-sft pins it."""
    pins = {}
    for line in peers.REQUIREMENTS.read_text().splitlines():
        spec = line.split("#")[0].strip()
        if spec and not spec.startswith("-"):
            name, _, version = spec.partition("==")
            pins[name.lower()] = version
    assert "llama-cpp-python" in pins and not any(name.startswith("onnx") for name in pins)
    constraints = dict(line.strip().lower().split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
    for name in ("transformers", "torch"):
        assert pins[name] == constraints[name], name
