"""Several LoRA adapters of one base served by one server (serve/backends/lora.py, serve/http/adapters.py): every
adapter's greedy answer equals its peft model's, alone and mixed in one batch with other adapters and base rows;
/v1/models and the 404 for an unknown name; hot load and unload (409, drain) behind the API key; every bad
adapter file a 4xx naming it while the others keep serving.

The export folder is built here as a multi-adapter `lite-sft export` writes it (lite_sft/adapters.py): the
builder's graph of the built-in tiny Llama with LoRA branches, one adapter file per peft adapter (random weights)
and adapters.json, plus a parity.json so that the folder is an export OUT."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from lite_sft import tiny
from lite_sft.adapters import AdapterEntry, Manifest, input_names, peft_sites, write_adapter_file, write_manifest
from lite_sft.options import ServerSettings
from lite_sft.serve.backends.factory import load_backend
from lite_sft.serve.backends.folder import stop_ids
from lite_sft.serve.backends.lora import LoraOrtBackend
from lite_sft.serve.server import create_app

from conftest import Slow, uvicorn_running

ort = pytest.importorskip("onnxruntime")
TARGETS = ["q_proj", "v_proj", "down_proj"]
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
NEW = 6  # tokens per answer
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [30, 31]]
# name -> (seed, rank, targets): two served from the start, one loaded while serving
ADAPTERS = {"alpha": (0, 4, TARGETS), "beta": (1, 8, ["q_proj", "v_proj"]), "gamma": (2, 2, ["v_proj", "down_proj"])}


def peft_model(merged, seed: int, r: int, targets: list[str]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    return peft.eval(), peft_sites({k: v for k, v in peft.state_dict().items() if "lora_" in k}, 2.0)


def greedy(model, prompt: list[int]) -> list[int]:
    """`NEW` greedy tokens, end-of-sequence ignored (the server is asked the same with ignore_eos)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(NEW):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(OUT, {name or "base": {prompt index: expected text}}, gamma's file): the export and the reference answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lite_sft.export.exporters import builder
    from lite_sft.export.lora_graph import add_lora_branches

    root = tmp_path_factory.mktemp("multi-adapter")
    out = root / "team"
    merged = tiny.materialize_builtin_model()
    builder._build(merged, out / "onnx", "fp32", "cpu", disable_qkv_fusion="true")
    sites = add_lora_branches(out / "onnx" / "model.onnx", set(TARGETS))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    answers, entries, files = {}, [], {}
    base = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    answers["base"] = [tokenizer.decode(greedy(base, p), skip_special_tokens=True) for p in PROMPTS]
    for name, (seed, r, targets) in ADAPTERS.items():
        model, weights = peft_model(merged, seed, r, targets)
        answers[name] = [tokenizer.decode(greedy(model, p), skip_special_tokens=True) for p in PROMPTS]
        where = out / "adapters" if name != "gamma" else root / "loose"
        files[name] = write_adapter_file(where / f"{name}.onnx_adapter", weights)
        if name != "gamma":
            entries.append(AdapterEntry(name, f"adapters/{name}.onnx_adapter", r, 2.0 * r, 2.0, targets,
                                        run_dir=f"runs/{name}", gate={"passed": True}))
    assert len({tuple(a) for a in answers.values()}) == len(answers), "the adapters should answer differently"
    write_manifest(out, Manifest({"name_or_path": str(merged), "digest": "test", "quant": None}, sites, entries))
    (out / "parity.json").write_text(json.dumps({"task": "causal-lm", "gates": [{"stage": "onnx", "passed": True}]}))
    return out, answers, files


def app_over(out, delay: float = 0.0, **settings):
    backend, tokenizer = load_backend(out, "cpu", threads=1)
    assert isinstance(backend, LoraOrtBackend)
    return create_app(Slow(backend, delay) if delay else backend, tokenizer,
                      ServerSettings("team", **{"api_key": KEY, **settings}), stop_ids(backend.folder, tokenizer))


@pytest.fixture(scope="module")
def server(export):
    out, _, _ = export
    application = app_over(out, delay=0.02, max_batch=16)
    with uvicorn_running(application) as url:
        yield url, application


def complete(url: str, model: str | None, prompt: int, **extra) -> httpx.Response:
    body = {"prompt": PROMPTS[prompt], "max_tokens": NEW, "temperature": 0, "ignore_eos": True, **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_each_adapter_alone_answers_as_its_peft_model(export, server):
    _, answers, _ = export
    url, _ = server
    for name in ("alpha", "beta", "base"):
        for i in range(len(PROMPTS)):
            response = complete(url, name, i)
            assert text(response) == answers[name][i], (name, i)
            assert response.json()["model"] == name
    assert text(complete(url, None, 0)) == answers["base"][0]  # no model: the base
    assert text(complete(url, "team", 0)) == answers["base"][0]  # the server's own name: the base too


@pytest.mark.parametrize("clients", [4, 16])
def test_mixed_batches_give_each_row_its_own_adapter(export, server, clients):
    _, answers, _ = export
    url, application = server
    steps = application.state.engine.batch_size
    before = (steps._sum.get(), sum(b.get() for b in steps._buckets))
    work = [(("alpha", "beta", "base")[k % 3], k % len(PROMPTS)) for k in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(lambda job: text(complete(url, *job)), work))
    assert got == [answers[name][i] for name, i in work]
    rows, count = steps._sum.get() - before[0], sum(b.get() for b in steps._buckets) - before[1]
    assert rows / count > 1.5, "the requests should have shared decode steps"


def test_models_lists_base_and_each_adapter_and_an_unknown_name_is_404(server):
    url, _ = server
    models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in models] == ["base", "alpha", "beta"]
    assert models[1]["adapter"] == {"rank": 4, "targets": ["down_proj", "q_proj", "v_proj"]}
    assert models[2]["adapter"] == {"rank": 8, "targets": ["q_proj", "v_proj"]}
    health = httpx.get(url + "/health", headers=AUTH).json()
    assert health["adapters"] == ["alpha", "beta"] and "2 LoRA adapters (alpha, beta)" in health["backend"]
    assert "adapters" not in httpx.get(url + "/health").json()  # named to the key's holders only
    missing = complete(url, "delta", 0)
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'delta' does not exist" in error["message"] and "base, alpha, beta" in error["message"]
    chat = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={
        "model": "nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 404


def test_adapter_routes_need_the_key_and_a_keyless_server_refuses_them(export, server):
    url, _ = server
    assert httpx.post(url + "/v1/adapters", json={"name": "x", "path": "y"}).status_code == 401
    assert httpx.delete(url + "/v1/adapters/alpha").status_code == 401
    out, _, _ = export
    with uvicorn_running(app_over(out, api_key=None)) as keyless:
        refused = httpx.post(keyless + "/v1/adapters", json={"name": "x", "path": "y"})
        assert refused.status_code == 403 and "API key" in refused.json()["error"]["message"]
        assert httpx.delete(keyless + "/v1/adapters/alpha").status_code == 403


def bad_files(tmp_path, weights) -> dict[str, tuple]:
    """name -> (path, what the 400 says) for each way an adapter file can be wrong."""
    site = "layers.0.q_proj"
    (tmp_path / "corrupt.onnx_adapter").write_bytes(b"not an adapter at all")
    ranks = {site: weights[site], "layers.0.v_proj": {"A": np.ones((128, 3), np.float32),
                                                    "B": np.ones((3, 64), np.float32)}}
    other_base = {site: {"A": np.ones((96, 2), np.float32), "B": np.ones((2, 128), np.float32)}}
    untargeted = {"layers.0.up_proj": {"A": np.ones((128, 2), np.float32), "B": np.ones((2, 512), np.float32)}}
    return {
        "missing": (tmp_path / "gone.onnx_adapter", "no such adapter file"),
        "corrupt": (tmp_path / "corrupt.onnx_adapter", "is not an onnxruntime adapter file"),
        "ranks": (write_adapter_file(tmp_path / "ranks.onnx_adapter", ranks), "ranks [2, 3]"),
        "otherbase": (write_adapter_file(tmp_path / "other.onnx_adapter", other_base), "trained on another base"),
        "untargeted": (write_adapter_file(tmp_path / "untargeted.onnx_adapter", untargeted), "no LoRA branch"),
    }


def test_bad_adapter_files_are_a_400_naming_the_adapter_and_the_others_keep_serving(export, server, tmp_path):
    _, answers, files = export
    url, _ = server
    weights = {"layers.0.q_proj": {"A": np.ones((128, 2), np.float32), "B": np.ones((2, 128), np.float32)}}
    for name, (path, says) in bad_files(tmp_path, weights).items():
        response = httpx.post(url + "/v1/adapters", headers=AUTH, json={"name": name, "path": str(path)})
        assert response.status_code == 400, (name, response.text)
        message = response.json()["error"]["message"]
        assert f"adapter {name!r}" in message and says in message, message
    exists = httpx.post(url + "/v1/adapters", headers=AUTH, json={"name": "alpha", "path": str(files["gamma"])})
    assert exists.status_code == 409 and "'alpha' is already served" in exists.json()["error"]["message"]
    badname = httpx.post(url + "/v1/adapters", headers=AUTH, json={"name": "base", "path": str(files["gamma"])})
    assert badname.status_code == 400
    assert text(complete(url, "alpha", 1)) == answers["alpha"][1]
    assert [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]] == ["base", "alpha", "beta"]


def test_hot_load_then_use_then_unload(export, tmp_path):
    out, answers, files = export
    application = app_over(out)
    with uvicorn_running(application) as url:
        loaded = httpx.post(url + "/v1/adapters", headers=AUTH, json={"name": "gamma", "path": str(files["gamma"])})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["adapter"] == {"rank": 2, "targets": ["down_proj", "v_proj"]}
        assert [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]][-1] == "gamma"
        with ThreadPoolExecutor(4) as pool:  # the new one mixed with the others
            work = [("gamma", 0), ("alpha", 1), ("base", 2), ("gamma", 3)]
            assert list(pool.map(lambda job: text(complete(url, *job)), work)) == [answers[n][i] for n, i in work]
        # alpha goes: its columns come out of the middle of the bank, and gamma's move
        assert httpx.delete(url + "/v1/adapters/alpha", headers=AUTH).json() == {"id": "alpha", "object": "model",
                                                                                 "deleted": True}
        assert text(complete(url, "gamma", 2)) == answers["gamma"][2]
        assert text(complete(url, "beta", 2)) == answers["beta"][2]
        assert complete(url, "alpha", 0).status_code == 404
        gone = httpx.delete(url + "/v1/adapters/alpha", headers=AUTH)
        assert gone.status_code == 404 and "'alpha' is not served" in gone.json()["error"]["message"]
        backend = application.state.engine.backend
        assert backend.bank.width == 8 + 2 and set(backend.served_adapters()) == {"beta", "gamma"}


def test_unload_with_requests_in_flight_is_409_or_drains(export):
    out, answers, _ = export
    application = app_over(out, delay=0.15)
    with uvicorn_running(application) as url, ThreadPoolExecutor(2) as pool:
        running = pool.submit(lambda: complete(url, "beta", 2, max_tokens=NEW))
        time.sleep(0.5)  # it is decoding (each step 0.15 s)
        busy = httpx.delete(url + "/v1/adapters/beta", headers=AUTH)
        assert busy.status_code == 409, busy.text
        assert "'beta' has 1 request in flight" in busy.json()["error"]["message"]
        draining = httpx.delete(url + "/v1/adapters/beta", params={"drain": "true"}, headers=AUTH)
        assert draining.status_code == 202 and draining.json()["draining"] == 1
        assert complete(url, "beta", 0).status_code == 404  # no new request for a draining name
        assert text(complete(url, "alpha", 0)) == answers["alpha"][0]  # the others keep serving meanwhile
        assert text(running.result()) == answers["beta"][2]  # the in-flight one ends on the weights it began with
        deadline = time.monotonic() + 10
        while "beta" in application.state.engine.backend.served_adapters() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(application.state.engine.backend.served_adapters()) == {"alpha"}
        assert [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]] == ["base", "alpha"]


def test_the_start_up_lines_name_the_adapters(export, monkeypatch):
    import uvicorn

    from lite_sft.serve.server import serve

    out, _, _ = export
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    lines: list[str] = []
    serve(out, say=lines.append, port=0, device="cpu", threads=1)
    said = "\n".join(lines)
    assert "adapters: alpha (rank 4: down_proj, q_proj, v_proj), beta (rank 8: q_proj, v_proj)" in said, said
    assert "`base` picks the bare base" in said


def test_a_bank_row_uses_only_its_columns(export):
    """The backend's own calls: one prefill of rows of different adapters equals each alone (batch-invariant)."""
    out, _, _ = export
    backend, _ = load_backend(out, "cpu", threads=1)
    ids = np.array([[0, 5, 6, 7], [8, 9, 10, 11], [0, 0, 12, 13]], np.int64)
    mask = (np.arange(4) >= np.array([[1], [0], [2]])).astype(np.int64)
    mixed, state = backend.prefill(ids, mask, 8, ["alpha", "beta", None])
    backend.release(state)
    for row, name in enumerate(["alpha", "beta", None]):
        alone, state = backend.prefill(ids[row:row + 1, mask[row].argmax():], mask[row:row + 1, mask[row].argmax():],
                                       8, [name])
        backend.release(state)
        assert np.abs(alone[0] - mixed[row]).max() < 1e-4
    assert set(input_names("layers.0.q_proj")) <= set(backend.bank.tensors)
    with pytest.raises(Exception, match="'delta' is not loaded"):
        backend.prefill(ids, mask, 8, ["delta", None, None])


def test_the_graph_alone_or_a_broken_manifest_is_one_clear_error(export, tmp_path):
    from lite_sft.errors import ServeError
    from lite_sft.serve.backends.ort import OrtBackend

    out, _, _ = export
    with pytest.raises(ServeError, match="has LoRA branches .* serve the export folder holding adapters.json"):
        OrtBackend(out / "onnx", "cpu", threads=1)
    copy = tmp_path / "team"
    copy.mkdir()
    (copy / "onnx").symlink_to(out / "onnx")
    (copy / "adapters").symlink_to(out / "adapters")
    (copy / "parity.json").write_text((out / "parity.json").read_text())
    manifest = json.loads((out / "adapters.json").read_text())
    manifest["adapters"][0]["rank"] = 16
    (copy / "adapters.json").write_text(json.dumps(manifest))
    with pytest.raises(ServeError, match="adapter 'alpha': adapters/alpha.onnx_adapter holds rank 4"):
        load_backend(copy, "cpu", threads=1)
    (out / "adapters" / "alpha.onnx_adapter").rename(tmp_path / "moved")
    try:
        with pytest.raises(ServeError, match="adapter 'alpha': .*alpha.onnx_adapter: no such adapter file"):
            load_backend(out, "cpu", threads=1)
    finally:
        (tmp_path / "moved").rename(out / "adapters" / "alpha.onnx_adapter")


def test_chat_and_streaming_pick_the_adapter_too(export, server):
    _, answers, _ = export
    url, _ = server
    chat = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["model"] == "beta"
    body = {"model": "alpha", "prompt": PROMPTS[3], "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert {c["model"] for c in chunks} == {"alpha"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == answers["alpha"][3]
