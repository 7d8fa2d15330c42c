"""lite_sft.serve never imports lite_sft's training code. Each serve module is imported in a fresh interpreter,
the bench's rows for a tune run directory (base + adapter, loaded with lite_sft.model) are measured on a tiny
tuned run in another, and a token classifier answers as /v1/ner answers in a third; none may leave a training
module in sys.modules."""

import json
import os
import subprocess
import sys

import pytest

TRAINING = {"lite_sft.train", "lite_sft.data", "lite_sft.masking", "lite_sft.loss", "lite_sft.packing",
            "lite_sft.checkpoint", "lite_sft.plan"}
# All serve may use outside itself, and only to load a tune run for the bench (see lite_sft/serve's docstring):
# the loader, the config, the built-in base, and the run's task definition (lite_sft.tasks: heads, labels).
LOADING = {"lite_sft", "lite_sft.model", "lite_sft.config", "lite_sft.tiny", "lite_sft.tasks", "lite_sft.tasks.base",
           "lite_sft.tasks.causal_lm"}
SERVE = ["runtime", "generate", "engine", "server", "schemas", "torch_backend", "loadtest", "bench", "bench_report",
         "encoder", "seq2seq", "classify", "sessions", "stream"]
# What /v1/ner reads tags and entities with, the functions training and evaluation use (lite_sft/serve/classify.py).
NER = {"lite_sft.tasks.ner", "lite_sft.tasks.iob", "lite_sft.tasks.labels", "lite_sft.tasks.table"}
# The last line a probe prints: every lite_sft module the interpreter holds when the probe's code is done.
REPORT = "import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith('lite_sft'))))"


def probe(code: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", f"{code}\n{REPORT}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def lines(process: subprocess.Popen) -> list[str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return out.strip().splitlines()


def test_no_serve_module_imports_training_code():
    # All at once: each interpreter spends its seconds importing torch, and they need not wait for each other.
    running = {name: probe(f"import lite_sft.serve.{name}") for name in SERVE}
    loaded = {name: set(json.loads(lines(p)[-1])) for name, p in running.items()}
    assert {name: sorted(mods & TRAINING) for name, mods in loaded.items() if mods & TRAINING} == {}
    assert all(f"lite_sft.serve.{name}" in mods for name, mods in loaded.items())  # the probes did import


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, chat_jsonl):
    from lite_sft.config import load_config
    from lite_sft.train import tune

    out = tmp_path_factory.mktemp("serve-imports") / "run"
    tune(load_config(None, {"model.name_or_path": str(tiny_model_dir), "data.path": str(chat_jsonl),
                            "data.max_seq_len": 64, "lora.r": 4, "lora.alpha": 8, "train.max_steps": 1,
                            "train.micro_batch_size": 2, "train.eval_every": 0, "train.save_every": 0,
                            "output_dir": str(out)}))
    return out


def test_bench_of_a_tuned_run_loads_base_and_adapter_without_training_code(run_dir):
    code = (f"from lite_sft.serve.bench import BenchOptions, bench\n"
            f"opts = BenchOptions([8], [4], runs=1, warmup=0, device='cpu', threads=1, "
            f"backends=['torch-adapter', 'torch-merged'])\n"
            f"print(json.dumps(bench({str(run_dir)!r}, opts, say=lambda _: None)['backends']))")
    *_, backends, modules = lines(probe("import json\n" + code))
    rows = {b["backend"]: b for b in json.loads(backends)}
    assert set(rows) == {"torch-adapter", "torch-merged"}
    for row in rows.values():
        assert "skip" not in row and row["rows"][0]["decode_tok_s"]["p50"] > 0
    outside = {m for m in json.loads(modules) if not m.startswith("lite_sft.serve")}
    assert not outside & TRAINING, sorted(outside & TRAINING)
    assert {"lite_sft.model", "lite_sft.config"} <= outside <= LOADING  # what the package docstring names


@pytest.fixture(scope="module")
def token_classifier(tmp_path_factory, tiny_bert_dir):
    from transformers import AutoTokenizer, BertForTokenClassification

    out = tmp_path_factory.mktemp("serve-imports") / "ner"
    tags = ["O", "B-PER", "I-PER"]
    BertForTokenClassification.from_pretrained(tiny_bert_dir, num_labels=3, id2label=dict(enumerate(tags)),
                                               label2id={t: i for i, t in enumerate(tags)}).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(out)
    return out


def test_answering_as_ner_does_imports_no_training_code(token_classifier):
    code = (f"from lite_sft.serve.classify import encode, entities\n"
            f"from lite_sft.serve.runtime import load_backend\n"
            f"backend, tokenizer = load_backend({str(token_classifier)!r}, 'cpu', threads=1)\n"
            f"row = encode(tokenizer, ['peter visited paris'], None, 64, False, True)[0]\n"
            f"entities('peter visited paris', row.offsets, row.word_ids, backend.logits([row.row])[0], backend.labels)")
    modules = set(json.loads(lines(probe(code))[-1]))
    assert "lite_sft.tasks.ner" in modules  # the probe did read entities
    outside = {m for m in modules if not m.startswith("lite_sft.serve")}
    assert not outside & TRAINING, sorted(outside & TRAINING)
    assert outside <= LOADING | NER
