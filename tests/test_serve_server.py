"""The OpenAI-compatible server, run for real: uvicorn on 127.0.0.1 (a free port) in a thread, the official
`openai` client, raw HTTP for the errors, a slowed-down model for queueing, timeouts and disconnects, a
load test, and schemathesis fuzzing from the server's own OpenAPI schema."""

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from lite_sft.cli import app as cli
from lite_sft.serve.generate import SamplingParams, generate
from lite_sft.serve.backends.folder import load_tokenizer, stop_ids
from lite_sft.serve.backends.ort import OrtBackend
from lite_sft.serve.server import create_app
from lite_sft.options import ServerSettings

from conftest import Slow, fuzz_posts, uvicorn_running

openai = pytest.importorskip("openai")
runner = CliRunner()


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama exported as `lite-sft export` exports it (tokenizer and chat template beside it)."""
    from transformers import LlamaForCausalLM

    from lite_sft.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("serve-onnx") / "onnx"
    export_onnx(LlamaForCausalLM.from_pretrained(tiny_model_dir), out)
    return out


@pytest.fixture(scope="module")
def tokenizer(onnx_dir):
    return load_tokenizer(onnx_dir)


@contextmanager
def running(onnx_dir, tokenizer, delay=0.0, **options):
    """A real uvicorn server on 127.0.0.1 and a free port, stopped (and its engine closed) afterwards."""
    backend = OrtBackend(onnx_dir, "cpu", threads=1)
    application = create_app(Slow(backend, delay) if delay else backend, tokenizer,
                             ServerSettings("tiny", **options), stop_ids(onnx_dir, tokenizer))
    with uvicorn_running(application) as url:
        yield url, application


@pytest.fixture(scope="module")
def server(onnx_dir, tokenizer):
    with running(onnx_dir, tokenizer) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


def direct(onnx_dir, tokenizer, prompt_ids, n=8):
    """What the generation loop itself answers, greedy: the server must say exactly this."""
    backend = OrtBackend(onnx_dir, "cpu", threads=1)
    params = SamplingParams(max_new_tokens=n, stop_ids=stop_ids(onnx_dir, tokenizer))
    return "".join(e.text for e in generate(backend, [prompt_ids], params, tokenizer))


def test_openai_client_completions(client, onnx_dir, tokenizer):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    expected = direct(onnx_dir, tokenizer, tokenizer("hello there")["input_ids"])
    done = client.completions.create(model="tiny", prompt="hello there", max_tokens=8, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens == len(tokenizer("hello there")["input_ids"]) and done.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="tiny", prompt="hello there", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    several = client.completions.create(model="tiny", prompt=["hello", "the quick"], max_tokens=4, n=2,
                                        temperature=1.0, seed=5, extra_body={"top_k": 20})
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    ids = client.completions.create(model="tiny", prompt=[40, 41, 42], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_openai_client_chat(client, onnx_dir, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    expected = direct(onnx_dir, tokenizer, prompt)
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == expected
    assert done.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    stop = expected[2:4]
    if stop.strip():
        cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == expected[:expected.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_errors_have_openai_shape(server, client):
    def post(path, body, **kw):
        raw = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(server + path, content=raw, headers={"content-type": "application/json"}, **kw)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return r.status_code, error

    assert post("/v1/completions", '{"prompt": "hi", "max_tokens": 5')[0] == 400
    status, error = post("/v1/completions", {"prompt": "hi", "logprobs": 2})
    assert status == 400 and error["param"] == "logprobs" and "unsupported" in error["message"]
    assert post("/v1/completions", {"prompt": "hi", "max_tokens": 0})[0] == 400
    status, error = post("/v1/completions", {"prompt": "hi", "max_tokens": 10**6})
    assert status == 400 and error["code"] == "context_length_exceeded" and "256" in error["message"]
    status, error = post("/v1/completions", {"prompt": [5] * 300, "max_tokens": 1})
    assert status == 400 and error["code"] == "context_length_exceeded"
    assert post("/v1/completions", {"prompt": [10**9]})[0] == 400
    for wrong_type in ({"prompt": [True]}, {"prompt": "hi", "stream": "yes"}, {"prompt": "hi", "n": True}):
        assert post("/v1/completions", wrong_type)[0] == 400, wrong_type  # as typed in /openapi.json, no coercion
    assert post("/v1/completions", {"prompt": "hi", "temperature": 3})[0] == 400
    assert post("/v1/chat/completions", {"messages": []})[0] == 400
    assert post("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})[0] == 400
    assert post("/v1/completions", {"prompt": "hi", "model": "gpt-9"}) == (404, pytest.approx(
        {"message": "model 'gpt-9' does not exist; this server serves 'tiny'", "type": "invalid_request_error",
         "param": "model", "code": "model_not_found"}))
    assert httpx.get(server + "/v1/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10**5)


def test_health_metrics_and_api_key(server, onnx_dir, tokenizer):
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and "CPUExecutionProvider" in health["backend"] and health["context"] == 256
    metrics = httpx.get(server + "/metrics").text
    assert "lite_sft_requests_total" in metrics and "lite_sft_time_to_first_token_seconds_bucket" in metrics
    with running(onnx_dir, tokenizer, api_key="s3cret") as (url, _):
        body = {"prompt": "hi", "max_tokens": 2}
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        # Header bytes arrive decoded as latin-1: a non-ASCII key is a wrong key (401), never a crash (500).
        for sent in ("Bearer sécret".encode(), "Bearer sécret".encode("latin-1"), b"Bearer \xff"):
            assert httpx.post(url + "/v1/completions", json=body, headers={"Authorization": sent}).status_code == 401


def test_a_non_ascii_api_key(onnx_dir, tokenizer):
    with running(onnx_dir, tokenizer, api_key="clé-ключ") as (url, _):
        def status(header: bytes) -> int:
            body = {"prompt": "hi", "max_tokens": 2}
            return httpx.post(url + "/v1/completions", json=body, headers={"Authorization": header}).status_code

        assert status(b"Bearer nope") == 401 and status("Bearer clé".encode("latin-1")) == 401
        assert status("Bearer clé-ключ".encode()) == 200  # the key's UTF-8 bytes, as curl sends them
        r = httpx.get(url + "/v1/models", headers={"Authorization": b"Bearer cl\xc3"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_queue_full_is_429_and_a_slow_request_times_out(onnx_dir, tokenizer):
    with running(onnx_dir, tokenizer, delay=0.05, max_batch=1, max_queue=1, timeout_s=1.0) as (url, application):
        body = {"prompt": "hello", "max_tokens": 100, "ignore_eos": True}
        results = []
        threads = [threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/completions", json=body,
                                                                             timeout=30)))
                   for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.1)  # the first runs, the second waits, the rest find the queue full
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(429) >= 1 and codes.count(504) >= 1, codes  # 100 tokens x 50 ms is over the 1 s timeout
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
        time.sleep(0.3)
        assert application.state.engine.running_rows == 0  # the timed-out rows were dropped, not run to the end


def test_client_disconnect_mid_stream_stops_generation(onnx_dir, tokenizer):
    with running(onnx_dir, tokenizer, delay=0.02) as (url, application):
        engine = application.state.engine
        body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            next(lines)
        deadline = time.monotonic() + 5
        while engine.running_rows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running_rows == 0
        generated = engine.tokens._value.get()
        assert generated < 100  # 200 were asked; the row left the batch when the client went away
        assert httpx.get(url + "/health").json()["status"] == "ok"


class Held:
    """A tokenizer that blocks in encoding and chat-template rendering until the test releases it, as a prompt of
    a whole context's text does for a while: the server must answer other requests meanwhile."""

    def __init__(self, inner):
        self.inner, self.entered, self.released = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _hold(self):
        self.entered.set()
        self.released.wait(10)

    def __call__(self, *args, **kwargs):
        self._hold()
        return self.inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self._hold()
        return self.inner.apply_chat_template(*args, **kwargs)


def test_tokenising_does_not_hold_up_other_requests(onnx_dir, tokenizer):
    held = Held(tokenizer)
    with running(onnx_dir, held) as (url, _):
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for path, body in [("/v1/completions", {"prompt": "hello", "max_tokens": 2}), ("/v1/chat/completions", chat)]:
            held.entered.clear(), held.released.clear()
            answers = []
            asker = threading.Thread(target=lambda: answers.append(httpx.post(url + path, json=body, timeout=30)))
            asker.start()
            assert held.entered.wait(10)
            try:
                start = time.monotonic()
                assert httpx.get(url + "/health", timeout=3).json()["status"] == "ok"
                assert httpx.get(url + "/metrics", timeout=3).status_code == 200
                assert time.monotonic() - start < 1.5
            finally:
                held.released.set()
                asker.join()
            assert answers[0].status_code == 200, answers[0].text


def test_a_template_that_refuses_the_messages_is_a_400(onnx_dir):
    strict = load_tokenizer(onnx_dir)
    strict.chat_template = "{{ raise_exception('this model takes no system messages') }}"
    with running(onnx_dir, strict) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "system", "content": "be brief"}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages" and "no system messages" in error["message"]


def test_clients_that_give_up_free_their_place_and_their_rows(onnx_dir, tokenizer):
    with running(onnx_dir, tokenizer, delay=0.05, max_batch=1, max_queue=1) as (url, application):
        engine = application.state.engine

        def ask(max_tokens: int, timeout: float) -> httpx.Response:
            body = {"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True}
            return httpx.post(url + "/v1/completions", json=body, timeout=timeout)

        # The first runs 60 tokens (3 s at 50 ms a token), but its client gives up after 1.5 s.
        first = threading.Thread(target=lambda: pytest.raises(httpx.ReadTimeout, ask, 60, 1.5))
        first.start()
        deadline = time.monotonic() + 5
        while not engine.running_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the first, then its client gives up
            ask(2, 0.5)
        deadline = time.monotonic() + 1
        while httpx.get(url + "/health").json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running_rows == 1  # the first still runs: the place was freed, not reached
        assert "lite_sft_queue_depth 0.0" in httpx.get(url + "/metrics").text
        r = ask(2, 30)
        assert r.status_code == 200, r.text  # queued, not refused with 429
        first.join()
        assert engine.tokens._value.get() < 50  # the first's rows left the batch when its client went away


def test_queue_limit_and_a_client_that_leaves_under_continuous_batching(onnx_dir, tokenizer):
    """Two rows fit: a second request joins the running one, a third waits (the queue holds one), a fourth is
    refused with 429. When the second's client gives up, its row leaves the batch and the waiting request joins
    it at once, finishing long before the first."""
    with running(onnx_dir, tokenizer, delay=0.05, max_batch=2, max_queue=1) as (url, application):
        engine, results = application.state.engine, {}

        def ask(name: str, max_tokens: int, timeout: float) -> None:
            body = {"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True}
            try:
                results[name] = httpx.post(url + "/v1/completions", json=body, timeout=timeout).status_code
            except httpx.ReadTimeout:
                results[name] = "gave up"

        def start(name: str, max_tokens: int, timeout: float, until) -> threading.Thread:
            thread = threading.Thread(target=ask, args=(name, max_tokens, timeout))
            thread.start()
            deadline = time.monotonic() + 5
            while not until() and time.monotonic() < deadline:
                time.sleep(0.01)
            return thread

        first = start("first", 60, 30, lambda: engine.running_rows == 1)  # 60 tokens at 50 ms: 3 s
        leaver = start("leaver", 60, 0.8, lambda: engine.running_rows == 2)  # joins, then its client leaves
        waiting = start("waiting", 3, 30, lambda: engine.queued == 1)
        ask("refused", 3, 5)
        assert results["refused"] == 429
        leaver.join()
        waiting.join()
        assert results["leaver"] == "gave up" and results["waiting"] == 200
        assert first.is_alive()  # the waiting request took the leaver's place in the running batch
        first.join()
        assert results["first"] == 200


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_concurrent_requests_are_batched_and_answered_as_alone(onnx_dir, tokenizer, batching):
    """Requests arriving while another runs: continuous batching joins them to it at the next step, static
    batching runs them together after it; either way each answer, greedy or seeded sampling, is the one the
    request gets alone."""
    prompts = ["hello", "the quick brown fox", "a plan, a canal", "how are you?"]
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 11}
    asks = [(prompts[0], 20, {"temperature": 0}), (prompts[1], 6, {"temperature": 0}), (prompts[2], 6, sampled),
            (prompts[3], 4, {"temperature": 0})]
    with running(onnx_dir, tokenizer, max_batch=4, batching="continuous") as (url, _):  # one at a time: alone
        alone = [httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": n, **extra},
                            timeout=30).json()["choices"][0]["text"] for p, n, extra in asks]
    assert alone[0] == direct(onnx_dir, tokenizer, tokenizer(prompts[0])["input_ids"], n=20)
    with running(onnx_dir, tokenizer, delay=0.05, max_batch=4, batching=batching) as (url, application):
        out, finished = {}, []

        def ask(p, n, extra):
            r = httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": n, **extra}, timeout=30)
            out[p] = r.json()["choices"][0]["text"]
            finished.append(p)

        # One long request first: the others arrive while it runs.
        first = threading.Thread(target=ask, args=asks[0])
        first.start()
        time.sleep(0.2)
        rest = [threading.Thread(target=ask, args=a) for a in asks[1:]]
        for t in rest:
            t.start()
        for t in [first, *rest]:
            t.join()
        assert [out[p] for p in prompts] == alone
        batches = {s.labels["le"]: s.value for m in application.state.engine.batch_size.collect() for s in m.samples
                   if s.name.endswith("_bucket")}
        assert batches["1.0"] < batches["+Inf"]  # some steps ran more than one row
        # continuous: the short ones joined the long one and were done before it; static: they waited for it
        assert (finished[-1] == prompts[0]) == (batching == "continuous"), finished


def test_load_benchmark_has_no_errors_below_the_queue_limit(server):
    from lite_sft.serve.loadtest import format_load, load_test

    report = load_test(server, concurrency=3, duration_s=1.5, max_tokens=8)
    assert report["errors"] == {} and report["ok"] == report["requests"] > 3
    assert report["tokens_per_s"] > 0 and report["e2e_ms"]["p99"] >= report["e2e_ms"]["p50"] > 0
    assert "errors: none" in format_load(report)
    mixed = load_test(server, concurrency=2, duration_s=1.0, max_tokens=8, min_tokens=1)  # lengths drawn 1..8
    assert mixed["errors"] == {} and mixed["tokens_per_s"] / mixed["requests_per_s"] < 7  # tokens per request
    assert "1-8 tokens each" in format_load(mixed)
    from lite_sft.serve import ServeError

    with pytest.raises(ServeError, match="--min-tokens 9: between 1 and --max-tokens 8"):
        load_test(server, max_tokens=8, min_tokens=9)


def test_continuous_batching_benchmark_parts(server, monkeypatch):
    """benchmarks/continuous_batching.py's checks against a running server: same-seed answers alone and batched,
    and the memory run's request count and RSS samples (here the test process's own, the server runs in it)."""
    import os

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from continuous_batching import format_table, memory_run, same_seed

    assert same_seed(server, 6) == {"requests": 8, "identical": True, "differing": []}
    memory = memory_run(server, os.getpid(), requests=30, clients=3, every=10)
    assert memory["requests"] == 30 and memory["errors"] == 0
    assert [s["requests"] for s in memory["rss_mb"]] == [10, 20, 30, 30] and memory["rss_first_mb"] > 0
    row = {"concurrency": 4, "tokens_per_s": 100.0, "ttft_ms": {"p50": 10.0, "p95": 20.0}}
    table = format_table([{**row, "batching": "static"}, {**row, "batching": "continuous", "tokens_per_s": 150.0}])
    assert "4 | 100.0 | 150.0 | 1.50x | 10 / 20 | 10 / 20" in table


def test_port_in_use_and_bad_folders_are_clear_errors(onnx_dir, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = str(taken.getsockname()[1])
        result = runner.invoke(cli, ["serve", str(onnx_dir), "--port", port])
        assert result.exit_code == 2 and "in use" in result.output and "--port" in result.output
    finally:
        taken.close()
    import shutil

    shutil.copytree(onnx_dir, tmp_path / "broken")
    (tmp_path / "broken" / "model.onnx").write_text("garbage")
    result = runner.invoke(cli, ["serve", str(tmp_path / "broken"), "--port", "0"])
    assert result.exit_code == 2 and "onnxruntime could not load" in result.output
    result = runner.invoke(cli, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "not an exported model" in result.output
    result = runner.invoke(cli, ["serve", str(onnx_dir), "--batching", "dynamic"])
    assert result.exit_code == 2 and "--batching 'dynamic': choose one of continuous, static" in result.output


# -- fuzzing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_never_get_a_server_error(onnx_dir, tokenizer, mode):
    """Requests drawn from /openapi.json: valid ones (positive) and ones that break it (negative, which must
    be refused with a 4xx). No request may get a 5xx or take the server down."""
    # A short context keeps every valid request the fuzzer makes quick to answer.
    with running(onnx_dir, tokenizer, max_context=48, max_queue=64) as (url, _):
        assert fuzz_posts(url, mode, max_examples=40) == {"/v1/completions", "/v1/chat/completions"}
        assert httpx.get(url + "/health").json()["status"] == "ok"
        counts = [line for line in httpx.get(url + "/metrics").text.splitlines()
                  if line.startswith("lite_sft_requests_total{route=\"/v1/")]
        assert sum(float(line.split()[-1]) for line in counts) >= 40  # the fuzzer really sent requests
