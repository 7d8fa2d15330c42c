"""benchmarks/peers.py: the lite-sft side end to end on a tiny model (no peer venv is made), the comparison
arithmetic on made-up cells, the tokenizer both peers' converters read, and the peers' separate environment."""

from __future__ import annotations

import json
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


def test_quick_lite_sft_only_measures_every_cell(peers, tmp_path):
    result = peers.main(["--peers", "none", "--quick", "--precisions", "fp32,int8", "--batches", "2",
                         "--work-dir", str(tmp_path / "w")])
    cells = result["cells"]
    assert [(c["engine"], c["precision"], c["batch"]) for c in cells] == [("lite-sft", "fp32", 2), ("lite-sft", "int8", 2)]
    for c in cells:
        assert "error" not in c, c.get("error")
        # 8 new tokens: 7 after the first, per row; a tiny model on one thread makes hundreds a second
        assert 1 < c["decode_tok_s"] < 1e6 and 0 < c["ttft_ms"] < 60_000
        assert c["stats"]["e2e_ms"]["p50"] >= c["ttft_ms"]
    assert [c["artefact"] for c in cells] == ["onnx", "onnx-int8"]  # both from the one `--quantize int8` export
    assert result["comparison"] == [] and result["workload"]["prompt_len"] == 16
    assert result["engines"]["lite-sft"]["versions"]["onnxruntime"]
    saved = json.loads(next((tmp_path / "results").glob("peers-*.json")).read_text())
    assert saved["command"].startswith("python benchmarks/peers.py --peers none") and saved["device"]["threads"] == 1
    assert not (tmp_path / "w" / "peer-venv").exists()
    # the tokenizer convert_hf_to_gguf.py reads (Llama's SPM path) is in the folder the peers convert
    assert (tmp_path / "w" / "llama-h64-l2-i176-a4-kv2-v512" / "peer-source" / "tokenizer.model").is_file()


def test_compare_takes_the_faster_peer_and_the_lower_ttft(peers):
    cells = [cell("lite-sft", "int8", 1, 120.0, 80.0), cell("lite-sft-gqa", "int8", 1, 100.0, 70.0),
             cell("genai", "int8", 1, 170.0, 160.0), cell("llama.cpp", "int8", 1, 200.0, 100.0),
             cell("lite-sft", "fp32", 8, 200.0, 50.0), cell("lite-sft-gqa", "fp32", 8, 300.0, 50.0),
             cell("genai", "fp32", 8, 240.0, 60.0),
             {"engine": "llama.cpp", "precision": "fp32", "batch": 8, "artefact": "f32", "error": "boom"},
             cell("lite-sft", "int4", 1, 50.0, 10.0)]  # no peer measured: no comparison row
    rows = peers.compare(cells)
    assert rows == [  # lite-sft's faster graph is the one compared
        {"precision": "int8", "batch": 1, "lite_sft_graph": "lite-sft", "fastest_peer": "llama.cpp",
         "decode_ratio": 0.6, "lowest_ttft_peer": "llama.cpp", "ttft_ratio": 0.8, "meets_goal": False},
        {"precision": "fp32", "batch": 8, "lite_sft_graph": "lite-sft-gqa", "fastest_peer": "onnxruntime-genai",
         "decode_ratio": 1.25, "lowest_ttft_peer": "onnxruntime-genai", "ttft_ratio": 0.833, "meets_goal": True}]
    table = peers.format_table(cells, rows)
    assert "decode 0.60x, TTFT 0.80x" in table and "error: boom" in table
    assert "lite-sft-gqa" in table and table.count("decode 1.25x") == 1


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


def test_peer_processes_get_only_their_own_python_path(peers, tmp_path, monkeypatch):
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


def test_the_gate_on_a_group_query_attention_graph(peers, gqa_dir, tmp_path, monkeypatch):
    """The graph onnxruntime-genai's builder makes, through lite-sft's runtime: served from a folder of links
    and lite-sft's config, and gated; fed left-padded (as optimum's graphs are), the gate fails."""
    import lite_sft.serve.runtime as runtime

    builder_out = tmp_path / "genai"
    builder_out.mkdir()
    (builder_out / "model.onnx").symlink_to(gqa_dir / "model.onnx")
    (builder_out / "genai_config.json").write_text("{}")
    served = peers.served_gqa(tmp_path, builder_out, gqa_dir, "fp32")
    assert (served / "model.onnx").resolve() == (gqa_dir / "model.onnx").resolve()
    assert (served / "config.json").is_file() and not (served / "genai_config.json").exists()
    gate = peers.gqa_gate(gqa_dir, served, "fp32", "cpu", 1)
    assert gate["passed"] and gate["right_padded"] and gate["batch_logits_max_abs_diff"] < 1e-5
    monkeypatch.setattr(runtime, "_uses_gqa", lambda _: False)
    gate = peers.gqa_gate(gqa_dir, served, "int4", "cpu", 1)
    assert not gate["passed"] and gate["batch_logits_max_abs_diff"] > 0.05
