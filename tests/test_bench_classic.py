"""benchmarks/sst2.py, conll.py and classifiers_multi.py end to end on a tiny random BERT and slices of the shared
data: tune, export with int8, the backends compared, a results file with the figures the README quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED.is_dir(), reason="the shared data sets (../shared/data) are not here")]


@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import their helpers from beside themselves
    import workload

    monkeypatch.setattr(workload, "RESULTS", tmp_path / "results")  # never into the committed results
    (tmp_path / "results").mkdir()
    return __import__("importlib").import_module


def test_sst2_quick_tunes_exports_and_compares(bench, tiny_bert_dir, tmp_path):
    result = bench("sst2").main(["--quick", "--model", str(tiny_bert_dir), "--work", str(tmp_path / "w"),
                                 "--threads", "1", "--batch", "64"])
    assert result["train_sentences"] == 2000 and result["dev_sentences"] == 200
    assert [b["model"] for b in result["backends"]] == ["PyTorch, adapter (as tuned)", "PyTorch, merged",
                                                        "ONNX fp32", "ONNX int8"]
    merged, fp32 = result["backends"][1], result["backends"][2]
    assert fp32["accuracy"] == pytest.approx(merged["accuracy"], abs=1 / 200)  # the same model, exported
    assert all(b["sequences_per_s"] > 0 for b in result["backends"][1:])
    assert "int8_within_1_point" in result and result["parity"]
    saved = json.loads(next((tmp_path / "results").glob("sst2-*.json")).read_text())
    assert saved["command"] and saved["versions"]["torch"]


def test_conll_quick_tunes_exports_and_compares(bench, tiny_bert_dir, tmp_path):
    result = bench("conll").main(["--quick", "--epochs", "1", "--model", str(tiny_bert_dir), "--work",
                                  str(tmp_path / "w"), "--threads", "1", "--batch", "64"])
    assert 0 <= result["test_f1"] <= 1 and set(result["test_per_type"]) <= {"LOC", "MISC", "ORG", "PER"}
    merged, fp32 = result["backends"][1], result["backends"][2]
    assert fp32["test_f1"] == pytest.approx(merged["test_f1"], abs=0.01)
    assert next((tmp_path / "results").glob("conll-*.json"))


def test_classifiers_multi_quick_exports_together_and_compares(bench, tiny_bert_dir, tmp_path):
    result = bench("classifiers_multi").main(["--quick", "--model", str(tiny_bert_dir), "--work",
                                              str(tmp_path / "w"), "--threads", "1"])
    assert result["export"]["passed"] and result["runs"]["sentiment"]["train_examples"] == 2000
    for variant in ("fp32", "int8"):
        multi, singles = result["quality"][variant]["multi"], result["quality"][variant]["singles"]
        assert 0 <= multi["sst2_accuracy"] <= 1 and 0 <= multi["conll_f1"] <= 1 and "/" in singles["differing"]
        assert set(result["speed"][variant]) == {"multi", "multi, one pass", "multi, halves apart", "singles",
                                                 "singles, 2 threads"}
        assert all(s["median"] > 0 for s in result["speed"][variant].values())
        memory = result["memory"][variant]
        assert memory["multi"]["peak_rss_mb"] > memory["imports"]["imports_rss_mb"] > 0
    fp32 = result["quality"]["fp32"]
    assert fp32["multi"]["sst2_accuracy"] == pytest.approx(fp32["singles"]["sst2_accuracy"], abs=2 / 200)
    assert next((tmp_path / "results").glob("classifiers_multi-*.json"))
