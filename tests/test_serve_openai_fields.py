"""Fields OpenAI clients send with their default values, and OpenAI's presence and frequency penalties, through
the HTTP API: the official openai client against a real uvicorn server over the tiny Llama (PyTorch backend)."""

import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from lite_sft.serve.generate import SamplingParams, generate_ids
from lite_sft.serve.backends.folder import load_tokenizer
from lite_sft.serve.server import create_app
from lite_sft.serve.backends.pytorch import TorchBackend
from lite_sft.options import ServerSettings

from conftest import Slow, uvicorn_running

openai = pytest.importorskip("openai")
PROMPT = [40, 41, 42, 43]
N = 16


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return TorchBackend.from_folder(tiny_model_dir, "cpu", threads=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@contextmanager
def running(backend, tokenizer, delay=0.0, **options):
    application = create_app(Slow(backend, delay) if delay else backend, tokenizer, ServerSettings("tiny", **options))
    with uvicorn_running(application) as url:
        yield url


@pytest.fixture(scope="module")
def client(backend, tokenizer):
    with running(backend, tokenizer) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_default_valued_fields_are_accepted(client):
    messages = [{"role": "user", "content": "hello"}]
    defaults = dict(presence_penalty=0, frequency_penalty=0.0)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                          logprobs=False, response_format={"type": "text"}, **defaults)
    assert chat.choices[0].message.content == plain.choices[0].message.content
    done = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0, **defaults,
                                     extra_body={"logprobs": None})
    assert done.choices[0].text == client.completions.create(model="tiny", prompt="hello", max_tokens=4,
                                                             temperature=0).choices[0].text


def test_what_would_change_the_answer_is_refused_naming_the_field(client):
    url = str(client.base_url).rstrip("/")
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    for field, value in [("logprobs", True), ("response_format", {"type": "json_object"}),
                         ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
                         ("presence_penalty", 2.5), ("frequency_penalty", -3)]:
        r = httpx.post(url + "/chat/completions", json={**chat, field: value})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == field and field in error["message"], (field, error)
    for value in (True, 2, 0):  # the completions endpoint's logprobs is a count: even 0 returns the chosen ones'
        r = httpx.post(url + "/completions", json={"prompt": "hi", "logprobs": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
        assert "unsupported" in r.json()["error"]["message"]


def test_penalties_push_the_output_the_expected_way(client, backend, tokenizer):
    """Greedy: a large frequency penalty never repeats a token, a negative presence penalty repeats the first."""
    def tokens(**penalties):
        return generate_ids(backend, [PROMPT], SamplingParams(max_new_tokens=N, **penalties))[0]

    plain, spread, stuck = tokens(), tokens(frequency_penalty=2.0), tokens(presence_penalty=-2.0)
    assert len(set(plain)) < N  # the tiny model repeats itself, so the penalty has something to prevent
    assert len(spread) == len(set(spread)) == N
    assert stuck == [stuck[0]] * N
    for ids, penalties in ((spread, {"frequency_penalty": 2}), (stuck, {"presence_penalty": -2})):
        for temperature in (0, 1e-6):  # both greedy: an argmax, and the sampling path's tiny temperature
            done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=temperature,
                                             extra_body={"ignore_eos": True}, **penalties)
            assert done.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_row_with_penalties_batched_with_one_without_gets_its_tokens_alone(backend, tokenizer):
    asks = {"plain": {"prompt": PROMPT, "max_tokens": N, "temperature": 0},
            "penalised": {"prompt": PROMPT[::-1], "max_tokens": N, "temperature": 0, "frequency_penalty": 2,
                          "presence_penalty": 0.5},
            "sampled": {"prompt": PROMPT[:2], "max_tokens": N, "temperature": 1.0, "seed": 3,
                        "presence_penalty": 1.5}}

    def ask(url, name, out):
        r = httpx.post(url + "/v1/completions", json={**asks[name], "ignore_eos": True}, timeout=30)
        out[name] = r.json()["choices"][0]["text"]

    alone = {}
    with running(backend, tokenizer) as url:
        for name in asks:
            ask(url, name, alone)
    together = {}
    with running(backend, tokenizer, delay=0.05, max_batch=4) as url:
        threads = [threading.Thread(target=ask, args=(url, name, together)) for name in asks]
        for t in threads:
            t.start()
            time.sleep(0.1)  # each joins the running batch at a later step
        for t in threads:
            t.join()
    assert together == alone
