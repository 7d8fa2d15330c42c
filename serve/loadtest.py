"""Load benchmark against a running server: N concurrent streaming clients for a bounded time.

    lite-sft serve exports/demo --port 8000 &
    lite-sft bench --url http://127.0.0.1:8000 --concurrency 8 --duration 20 --max-tokens 32

Each client sends one streaming /v1/completions request after another (`ignore_eos`, so every answer has
`max_tokens` tokens unless the server cuts it) until the time is up; requests under way then finish. With
`min_tokens` each request asks a length drawn uniformly from min_tokens..max_tokens (seeded per client), as
real traffic mixes short and long answers: static batching then holds every row until the batch's longest ends. Reported:
requests/s, generated tokens/s, end-to-end latency and time to first token percentiles, and errors by
status. With concurrency at or below the server's queue limit there must be no error: the queue never fills.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import numpy as np

from lite_sft.errors import ServeError

DEFAULT_PROMPT = "Write 40817 backwards."


async def _client(http, url: str, body: dict, deadline: float, results: list[dict], lengths: random.Random | None,
                  min_tokens: int) -> None:
    while time.perf_counter() < deadline:
        start, first, tokens, status = time.perf_counter(), None, 0, None
        asked = body if lengths is None else {**body, "max_tokens": lengths.randint(min_tokens, body["max_tokens"])}
        try:
            async with http.stream("POST", url + "/v1/completions", json=asked) as response:
                status = str(response.status_code)
                if response.status_code == 200:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            status = "stream error: " + chunk["error"].get("type", "?")
                        elif chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif first is None and chunk["choices"]:  # the server sends a chunk per token
                            first = time.perf_counter()
                else:
                    await response.aread()
        except Exception as err:  # noqa: BLE001  (httpx's transport errors: counted, the run goes on)
            status = type(err).__name__
        end = time.perf_counter()
        results.append({"status": status, "e2e_s": end - start, "ttft_s": (first or end) - start, "tokens": tokens,
                        "end": end})


async def _run(url: str, concurrency: int, duration_s: float, body: dict, headers: dict, timeout_s: float,
               min_tokens: int | None) -> tuple:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits) as http:
        try:
            models = (await http.get(url + "/v1/models")).json()
            body = {**body, "model": models["data"][0]["id"]}
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            raise ServeError(f"no lite-sft server answers at {url} ({type(err).__name__}: {err}); start one with "
                             "`lite-sft serve MODEL_DIR` (and pass --api-key if it wants one)") from err
        results: list[dict] = []
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, url, body, start + duration_s, results,
                                       None if min_tokens is None else random.Random(c), min_tokens or 1)
                               for c in range(concurrency)))
        return results, time.perf_counter() - start


def load_test(url: str = "http://127.0.0.1:8000", concurrency: int = 4, duration_s: float = 20.0,
              max_tokens: int = 32, prompt: str = DEFAULT_PROMPT, api_key: str | None = None,
              timeout_s: float = 120.0, min_tokens: int | None = None) -> dict:
    if concurrency < 1 or duration_s <= 0 or max_tokens < 1:
        raise ServeError("concurrency and max_tokens at least 1, duration above 0")
    if min_tokens is not None and not 1 <= min_tokens <= max_tokens:
        raise ServeError(f"--min-tokens {min_tokens}: between 1 and --max-tokens {max_tokens}")
    url = url.rstrip("/").removesuffix("/v1")
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, wall = asyncio.run(_run(url, concurrency, duration_s, body, headers, timeout_s, min_tokens))
    ok = [r for r in results if r["status"] == "200"]

    def pct(key: str) -> dict:
        values = [r[key] * 1e3 for r in ok]
        return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)} if values else {}

    return {"benchmark": "serve-load", "url": url, "concurrency": concurrency, "duration_s": round(wall, 3),
            "max_tokens": max_tokens, "min_tokens": min_tokens, "requests": len(results), "ok": len(ok),
            "errors": dict(Counter(r["status"] for r in results if r["status"] != "200")),
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "e2e_ms": pct("e2e_s"), "ttft_ms": pct("ttft_s")}


def format_load(report: dict) -> str:
    e2e, ttft = report["e2e_ms"], report["ttft_ms"]
    tokens = report["max_tokens"] if report.get("min_tokens") is None else \
        f"{report['min_tokens']}-{report['max_tokens']}"
    lines = [f"load: {report['concurrency']} clients for {report['duration_s']:.1f} s against {report['url']}, "
             f"{tokens} tokens each",
             f"  requests {report['requests']} ({report['ok']} ok), {report['requests_per_s']:.2f} req/s, "
             f"{report['tokens_per_s']:.1f} generated tokens/s"]
    if e2e:
        lines.append(f"  latency ms  p50 {e2e['p50']:.0f}  p95 {e2e['p95']:.0f}  p99 {e2e['p99']:.0f};  "
                     f"TTFT ms  p50 {ttft['p50']:.0f}  p95 {ttft['p95']:.0f}  p99 {ttft['p99']:.0f}")
    lines.append("  errors: " + (", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "none"))
    return "\n".join(lines)
