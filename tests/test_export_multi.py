"""Several runs of one base exported together (export/multi.py): one base graph with LoRA branches, an adapter file
per run, the manifest, a gate per adapter per stage and a mixed batch; and every refusal, before anything is
written."""

import json
import shutil

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from lite_sft.adapters import read_adapter_file, read_manifest
from lite_sft.cli import app
from lite_sft.export import ExportError
from lite_sft.export.multi import export_runs
from lite_sft.export.multi_runs import base_digest, read_runs
from lite_sft.options import ExportOptions
from lite_sft.train import tune

from conftest import make_tokenizer
from test_export import build_base, run_config

pytest.importorskip("onnxruntime_genai")
runner = CliRunner()
FAST = dict(parity_prompts=2, parity_tokens=6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe_tokenizer, chat_jsonl):
    """Two finished runs on one tiny Llama: rank 4 on q and v, rank 8 with rsLoRA on q, k, v, o and down."""
    root = tmp_path_factory.mktemp("multi")
    base = build_base(root / "base", "llama", bpe_tokenizer)
    made = {}
    for name, overrides in {"sentiment": {"lora.target_modules": ["q_proj", "v_proj"]},
                            "support": {"lora.r": 8, "lora.alpha": 16, "lora.use_rslora": True, 
                                        "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}
                            }.items():
        made[name] = root / name
        tune(run_config(base, chat_jsonl, made[name], **overrides))
    return root, base, made


def edited(run, where, **changes):
    """A copy of `run` at `where` whose config.yaml has `changes` ({"section.key": value})."""
    shutil.copytree(run, where)
    config = yaml.safe_load((where / "config.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    (where / "config.yaml").write_text(yaml.safe_dump(config))
    return where


def test_two_runs_give_one_graph_an_adapter_each_and_every_gate(runs, tmp_path):
    _, base, made = runs
    out = tmp_path / "team"
    opts = ExportOptions(quantize="int8", names=[f"{made['support']}=help-desk"], **FAST)
    report = export_runs([made["sentiment"], made["support"]], out, opts, say=lambda _: None)
    assert report["passed"] and report["task"] == "causal-lm" and not report["not_run"]
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "adapters.json", "base", "onnx", "onnx-int8",
                                                     "parity.json"]
    manifest = read_manifest(out)
    assert [a.name for a in manifest.adapters] == ["sentiment", "help-desk"]
    sentiment, support = manifest.adapters
    assert (sentiment.rank, sentiment.scale, sentiment.targets) == (4, 2.0, ["q_proj", "v_proj"])
    assert support.rank == 8 and support.rslora and support.scale == pytest.approx(16 / 8 ** 0.5)
    assert support.targets == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert manifest.base["digest"].startswith("sha256:") and manifest.base["source"] == str(base.resolve())
    assert manifest.base["digest"] == base_digest(str(base))
    # The graph's sites are the union of the targets; each file holds its own run's only.
    assert {s.name.split(".", 2)[2] for s in manifest.sites} == set(support.targets)
    assert set(read_adapter_file(out / sentiment.file)) == {f"layers.{i}.{m}" for i in (0, 1)
                                                             for m in ("q_proj", "v_proj")}
    for entry in manifest.adapters:
        assert set(entry.gate) == {"merge", "onnx", "int8"} and all(g["passed"] for g in entry.gate.values())
    # parity.json: a gate per adapter per stage, each alone and as a padded batch, and a mixed batch per graph.
    parity = json.loads((out / "parity.json").read_text())
    assert [(g["stage"], g["adapter"]) for g in parity["gates"]] == [
        ("merge", "sentiment"), ("merge", "help-desk"), ("onnx", "sentiment"), ("onnx", "help-desk"),
        ("int8", "sentiment"), ("int8", "help-desk")]
    assert all(g["batch"]["passed"] for g in parity["gates"] if g["stage"] != "merge")
    assert parity["adapters"]["help-desk"]["prompts"]["count"] == 2 and parity["adapters"]["help-desk"]["stop_ids"]
    onnx = next(g for g in parity["gates"] if g["stage"] == "onnx")
    assert onnx["greedy_agreement"] == 1.0 and onnx["max_abs_diff"] < 1e-3 * max(1, onnx["logit_scale"])
    assert [(m["stage"], m["adapters"], m["passed"]) for m in parity["mixed"]] == [
        ("onnx", ["sentiment", "help-desk"], True), ("int8", ["sentiment", "help-desk"], True)]
    assert parity["mixed"][0]["vs_alone"]["greedy_agreement"] == 1.0
    assert parity["mixed"][0]["vs_alone"]["max_abs_diff"] < 1e-4
    # int8: the base's weights are quantised, the LoRA branches are still float MatMuls on the bank inputs.
    import onnx as onnx_lib

    graph = onnx_lib.load(str(out / "onnx-int8" / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    assert all(n.op_type == "MatMul" for n in graph.node if "/lora/" in n.name and n.name.endswith(("/A", "/B")))
    # base/ is a Hugging Face folder of the base itself (a 16/32-bit run: the checkpoint's weights).
    from safetensors.numpy import load_file

    saved, original = load_file(out / "base" / "model.safetensors"), load_file(base / "model.safetensors")
    assert all(np.array_equal(saved[k], original[k]) for k in original)


def test_refusals_name_the_runs_and_write_nothing(runs, tmp_path):
    root, base, made = runs
    a, b = made["sentiment"], made["support"]
    out = tmp_path / "out"
    other = build_base(tmp_path / "other-base", "llama", make_tokenizer(), num_hidden_layers=1)
    cases = [
        ([a, edited(b, tmp_path / "q4", **{"model.quant": "4bit"})], [],
         r"\(none\) and .*q4 \(4bit\) cannot share one base graph.*export them separately"),
        ([a, edited(b, tmp_path / "dora", **{"lora.use_dora": True})], [], r"dora is a DoRA run"),
        ([a, edited(b, tmp_path / "cls", **{"task.name": "seq-cls"})], [],
         r"sentiment is a causal-lm run and .*cls a seq-cls run: .*export them separately"),
        ([a, edited(b, tmp_path / "moved", **{"model.name_or_path": str(other)})], [],
         r"sentiment and .*moved were tuned on different bases .*the config or weight files differ"),
        ([a, b], [f"{tmp_path / 'elsewhere'}=x"], r"elsewhere is not one of the runs given"),
        ([a, b], [f"{a}=same", f"{b}=same"], r"are both named 'same'"),
        ([a, b], [f"{a}=has space"], r"adapter name 'has space' .* cannot be served"),
        ([a, b], [f"{a}=base"], r"'base' is the base's name"),
        ([a, a], [], r"is given twice"),
    ]
    # A copy of the base in another folder is the same base: the digest decides, not the path.
    copy = shutil.copytree(base, tmp_path / "base-copy")
    same = read_runs([a, edited(b, tmp_path / "copied", **{"model.name_or_path": str(copy)})], [], "fp32")
    assert same[0].digest == same[1].digest and same[0].base != same[1].base
    for run_dirs, names, message in cases:
        with pytest.raises(ExportError, match=message):
            export_runs(run_dirs, out, ExportOptions(names=names, **FAST), say=lambda _: None)
        assert not out.exists() and not list(tmp_path.glob("out.*"))


def test_a_different_tokenizer_is_refused(runs, tmp_path):
    _, _, made = runs
    changed = shutil.copytree(made["support"], tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(changed)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(changed)
    with pytest.raises(ExportError, match="have different tokenizers: the vocabulary differs"):
        export_runs([made["sentiment"], changed], tmp_path / "out", ExportOptions(**FAST), say=lambda _: None)


def test_cli_several_runs_and_a_single_run_exports_as_before(runs, tmp_path):
    _, _, made = runs
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "parity.json").write_text("{}")
    # Bad input exits 2 in one line and leaves an existing OUT as it was.
    result = runner.invoke(app, ["export", str(made["sentiment"]), str(made["support"]), "--out", str(existing),
                                 "--overwrite", "--name", f"{made['sentiment']}=same", "--name",
                                 f"{made['support']}=same"])
    assert result.exit_code == 2 and "both named 'same'" in result.output, result.output
    assert sorted(p.name for p in existing.iterdir()) == ["parity.json"]
    result = runner.invoke(app, ["export", str(made["sentiment"]), "--out", str(tmp_path / "one"), "--name", "x=y"])
    assert result.exit_code == 2 and "alone exports merged" in result.output
    # One RUN: today's merged export, the same folders and parity.json keys.
    result = runner.invoke(app, ["export", str(made["sentiment"]), "--out", str(tmp_path / "one"),
                                 "--parity-prompts", "2", "--parity-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["merged", "onnx", "parity.json"]
    parity = json.loads((tmp_path / "one" / "parity.json").read_text())
    assert "names" not in parity["settings"] and [g["stage"] for g in parity["gates"]] == ["merge", "onnx"]


@pytest.mark.parametrize("quant, method", [("4bit", "int4"), ("8bit", "int8")])
def test_quantised_runs_share_their_dequantised_base_and_the_quantised_graph_keeps_float_branches(
        quant, method, tmp_path_factory, bpe_tokenizer, chat_jsonl, tmp_path):
    """4-bit (8-bit) runs of one base: base/ holds the dequantised NF4 (int8) weights they were trained against
    (not the checkpoint's), every adapter passes its gates on it, and the quantised graph (int4: rebuilt by the
    builder; int8: quantize_dynamic) gets the same float branches."""
    root = tmp_path_factory.mktemp(f"multi-{quant}")
    base = build_base(root / "base", "llama", bpe_tokenizer)
    made = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["o_proj", "up_proj"])):
        made.append(root / f"{quant}-{i}")
        tune(run_config(base, chat_jsonl, made[-1], **{"model.quant": quant, "lora.target_modules": targets}))
    lines = []
    report = export_runs(made, tmp_path / "out", ExportOptions(quantize=method, **FAST), say=lines.append)
    assert report["passed"], "\n".join(lines)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.base["quant"] == quant and manifest.base["merge_onto"] == "dequantized"
    assert [g["stage"] for g in report["gates"]] == ["merge", "merge", "onnx", "onnx", method, method]
    assert [m["passed"] for m in report["mixed"]] == [True, True]
    from safetensors.numpy import load_file

    saved, original = load_file(tmp_path / "out" / "base" / "model.safetensors"), load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(saved[key].astype(np.float32), original[key].astype(np.float16).astype(np.float32))
    import onnx as onnx_lib

    graph = onnx_lib.load(str(tmp_path / "out" / f"onnx-{method}" / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    assert {n.op_type for n in graph.node if "/lora/" in n.name and n.name.endswith(("/A", "/B"))} == {"MatMul"}
    assert f"mixed batch (onnx-{method})" in "\n".join(lines)


def test_lora_outside_the_decoder_projections_and_other_architectures_are_refused(runs, tmp_path, bpe_tokenizer,
                                                                                 chat_jsonl):
    root, base, made = runs
    head = tmp_path / "head"
    tune(run_config(base, chat_jsonl, head, **{"lora.target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(ExportError, match=r"head trains LoRA outside the decoder layers' projections.*lm_head"):
        export_runs([made["sentiment"], head], tmp_path / "out", ExportOptions(**FAST), say=lambda _: None)
    saved = shutil.copytree(made["support"], tmp_path / "saved")
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["score"]}))
    with pytest.raises(ExportError, match=r"saved trains whole modules \(score\)"):
        export_runs([made["sentiment"], saved], tmp_path / "out", ExportOptions(**FAST), say=lambda _: None)
    gpt2 = build_base(tmp_path / "gpt2", "gpt2", bpe_tokenizer)
    tune(run_config(gpt2, chat_jsonl, tmp_path / "g1"))
    shutil.copytree(tmp_path / "g1", tmp_path / "g2")
    with pytest.raises(ExportError, match=r"cannot be exported with adapters: .*model builder does not take"):
        export_runs([tmp_path / "g1", tmp_path / "g2"], tmp_path / "out", ExportOptions(**FAST), say=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_fp16_graph_keeps_fp16_branches_and_passes_the_fp16_gate(runs, tmp_path):
    _, _, made = runs
    report = export_runs([made["sentiment"], made["support"]], tmp_path / "out", ExportOptions(dtype="fp16", **FAST),
                         say=lambda _: None)
    assert report["passed"] and {g["precision"] for g in report["gates"] if g["stage"] == "onnx"} == {"float16"}
    assert report["mixed"][0]["vs_alone"]["greedy_agreement"] == 1.0


def test_cli_exports_several_runs_and_a_failed_gate_keeps_them_aside(runs, tmp_path, monkeypatch):
    from lite_sft.export import multi

    _, _, made = runs
    args = ["export", str(made["sentiment"]), str(made["support"]), "--parity-prompts", "2", "--parity-tokens", "4"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "team")])
    assert result.exit_code == 0, result.output
    assert "exported to" in result.output and "adapters/ adapters.json parity.json" in result.output
    assert "sentiment: parity on" in result.output and "mixed batch (onnx)" in result.output

    def failing(*args, **kwargs):  # the support adapter's graph gate fails
        gate, alone = real(*args, **kwargs)
        gate.passed = gate.passed and gate.extra["adapter"] != "support"
        return gate, alone

    real = multi.adapter_gate
    monkeypatch.setattr(multi, "adapter_gate", failing)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "team"), "--overwrite"])
    assert result.exit_code == 1 and "parity gate failed" in result.output
    failed = json.loads((tmp_path / "team.parity-failed" / "parity.json").read_text())
    assert failed["passed"] is False and failed["mixed"][0]["passed"] is True
    assert json.loads((tmp_path / "team" / "parity.json").read_text())["passed"] is True  # the earlier export stays


def randomized(run, where, seed: int):
    """A copy of `run` whose LoRA weights are seeded random ones, large enough to move greedy answers away from the
    base (two steps of training barely move a random tiny model, so runs would answer alike)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, where)
    path = where / "adapter_model.safetensors"
    weights, gen = load_file(path), torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.5 if "lora_" in k else v for k, v in weights.items()}, path)
    return where


def test_runs_exported_together_are_served_each_as_its_own_run_alone_and_mixed(runs, tmp_path):
    """The whole path: `lite-sft export A B --out OUT`, then `lite-sft serve OUT`'s backend and app. Each adapter
    answers as its run's own PyTorch model (base + adapter, greedy) does, asked alone and in batches mixed with the
    other adapter and the base."""
    import asyncio

    import httpx
    import torch

    from lite_sft.model import load_tuned
    from lite_sft.options import ServerSettings
    from lite_sft.serve.backends.factory import load_backend
    from lite_sft.serve.backends.folder import stop_ids
    from lite_sft.serve.backends.lora import LoraOrtBackend
    from lite_sft.serve.server import create_app

    from conftest import uvicorn_running

    _, _, made = runs
    copies = {name: randomized(made[name], tmp_path / name, seed) for seed, name in enumerate(("sentiment", "support"))}
    out = tmp_path / "team"
    export_runs(list(copies.values()), out, ExportOptions(**FAST), say=lambda _: None)
    prompts, new = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23]], 6
    want = {}
    for name, run in copies.items():
        model, tokenizer, _ = load_tuned(run, torch.device("cpu"))
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                for _ in range(new):
                    ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            want[name, i] = tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True)
    assert any(want["sentiment", i] != want["support", i] for i in range(len(prompts)))  # the check can tell them apart

    backend, tokenizer = load_backend(out, "cpu", threads=1)
    assert isinstance(backend, LoraOrtBackend)
    app = create_app(backend, tokenizer, ServerSettings("team", max_batch=8), stop_ids(backend.folder, tokenizer))

    async def ask_all(url, pairs):
        async with httpx.AsyncClient(timeout=120) as http:
            async def one(name, i):
                r = await http.post(url + "/v1/completions", json={"model": name, "prompt": prompts[i],
                                    "max_tokens": new, "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(name, i) for name, i in pairs))

    with uvicorn_running(app) as url:
        pairs = [(name, i) for name in copies for i in range(len(prompts))]
        alone = [asyncio.run(ask_all(url, [pair]))[0] for pair in pairs]
        assert alone == [want[pair] for pair in pairs]
        mixed = asyncio.run(ask_all(url, pairs * 2 + [("base", 0)]))
        assert mixed[:-1] == [want[pair] for pair in pairs * 2]
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["base", "sentiment", "support"]
