"""A request over the context is refused with a message that blames what is too long: the prompt when it alone
fills the context (its token count and the limit), max_tokens only when it is what does not fit."""

import httpx
import pytest

from lite_sft.serve import ServeError
from lite_sft.serve.generate import SamplingParams, check_prompts
from lite_sft.serve.backends.folder import load_tokenizer
from lite_sft.serve.backends.seq2seq import Seq2SeqBackend
from lite_sft.serve.server import create_app
from lite_sft.serve.backends.pytorch import TorchBackend
from lite_sft.options import ServerSettings

from conftest import uvicorn_running


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    backend = TorchBackend.from_folder(tiny_model_dir, "cpu", threads=1)
    with uvicorn_running(create_app(backend, load_tokenizer(tiny_model_dir), ServerSettings("tiny"))) as url:
        yield url, backend


def refused(url, path, body):
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    return error


@pytest.mark.parametrize("length", [300, 256])  # over the context of 256, and filling it with no room to answer
def test_a_prompt_that_alone_fills_the_context_is_blamed(llama, length):
    url, _ = llama
    error = refused(url, "/v1/completions", {"prompt": [5] * length, "max_tokens": 1})
    assert error["param"] == "prompt"
    assert f"prompt is {length} tokens" in error["message"] and "256" in error["message"]
    assert "max_tokens" not in error["message"]


def test_a_chat_prompt_too_long_blames_the_messages_not_max_tokens(llama):
    url, _ = llama
    error = refused(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a " * 400}]})
    assert error["param"] == "messages" and "prompt is" in error["message"]
    assert "max_tokens" not in error["message"] and "max_completion_tokens" not in error["message"]


def test_max_tokens_is_blamed_when_it_is_what_does_not_fit(llama):
    url, _ = llama
    error = refused(url, "/v1/completions", {"prompt": [5] * 200, "max_tokens": 100})
    assert error["param"] == "max_tokens" and "lower max_tokens" in error["message"]


def test_the_generation_loop_blames_the_prompt_too(llama):
    _, backend = llama
    with pytest.raises(ServeError, match="prompt 0: the prompt is 256 tokens") as caught:
        check_prompts(backend, [0], [[5] * 256], [SamplingParams(max_new_tokens=1)])
    assert "max_new_tokens" not in str(caught.value)


def test_a_seq2seq_source_too_long_blames_the_prompt(tiny_t5_dir):
    backend = Seq2SeqBackend.from_folder(tiny_t5_dir, "cpu")
    tokenizer = load_tokenizer(tiny_t5_dir)
    with uvicorn_running(create_app(backend, tokenizer, ServerSettings("t5"))) as url:
        error = refused(url, "/v1/completions", {"prompt": [5] * (backend.max_context + 1), "max_tokens": 1})
    assert error["param"] == "prompt" and f"prompt is {backend.max_context + 1} tokens" in error["message"]
    assert "max_tokens" not in error["message"]
