"""A server with an API key, run for real (uvicorn over the tiny Llama, PyTorch backend): what unauthenticated
callers can see, the 401's challenge, docs that need no network, and the key read from the environment."""

from contextlib import contextmanager

import httpx
import pytest
from typer.testing import CliRunner

from lite_sft.cli import app as cli
from lite_sft.serve.backends.folder import load_tokenizer
from lite_sft.serve.server import create_app
from lite_sft.serve.backends.pytorch import TorchBackend
from lite_sft.options import ServerSettings

from conftest import uvicorn_running

KEY = "s3cret"


@contextmanager
def running(folder, **options):
    backend = TorchBackend.from_folder(folder, "cpu", threads=1)
    with uvicorn_running(create_app(backend, load_tokenizer(folder), ServerSettings("tiny", **options))) as url:
        yield url


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    with running(tiny_model_dir, api_key=KEY) as url:
        yield url


def test_health_shows_no_filesystem_path_without_the_key(keyed, tiny_model_dir):
    public = httpx.get(keyed + "/health")
    assert public.status_code == 200 and public.json()["status"] == "ok" and public.json()["model"] == "tiny"
    assert str(tiny_model_dir) not in public.text and tiny_model_dir.name not in public.text
    assert "backend" not in public.json()
    wrong = httpx.get(keyed + "/health", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 200 and "backend" not in wrong.json()
    details = httpx.get(keyed + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "cpu" in details["backend"].lower() and details["model"] == "tiny"


def test_health_without_a_key_configured_shows_the_backend(tiny_model_dir):
    with running(tiny_model_dir) as url:
        assert "cpu" in httpx.get(url + "/health").json()["backend"].lower()


def test_a_401_carries_the_bearer_challenge(keyed):
    r = httpx.post(keyed + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(keyed + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_docs_need_no_network(keyed):
    """FastAPI's /docs and /redoc pages load their scripts from a CDN, so offline they show nothing: they are
    off, and /openapi.json (the schema itself) stays."""
    for page in ("/docs", "/redoc"):
        r = httpx.get(keyed + page)
        assert r.status_code == 404 and "cdn" not in r.text.lower(), page
    assert httpx.get(keyed + "/openapi.json").json()["paths"]


def test_serve_reads_the_key_from_the_environment(tiny_model_dir, monkeypatch):
    """LITE_SFT_API_KEY, so the key never has to be on a command line, where `ps` shows it to every user."""
    seen = {}
    monkeypatch.setattr("lite_sft.serve.server.serve", lambda folder, **options: seen.update(options))
    result = CliRunner().invoke(cli, ["serve", str(tiny_model_dir)], env={"LITE_SFT_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert seen["api_key"] == KEY
