"""Request bodies of the OpenAI-compatible endpoints, as pydantic models; FastAPI validates against them and
publishes them in /openapi.json (which the fuzz test generates requests from).

    curl -s 127.0.0.1:8000/openapi.json | python -m json.tool | less

Unknown fields are refused (extra="forbid"), so a client that asks for something this server does not do
(logprobs, logit_bias, tools, ...) hears so instead of silently getting something else. The fields kept are
OpenAI's names and meanings, plus `top_k` and `repetition_penalty` as vLLM accepts them (the openai
client sends them with extra_body).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # OpenAI's own limit on stop sequences
MAX_CHOICES = 8


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False
    """Send a last chunk with the token counts (choices empty), as OpenAI does."""


class Sampling(Strict):
    """Fields both endpoints share."""

    model: Optional[str] = Field(None, max_length=256, description="The served model's name (see /v1/models).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 for greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 for no top-k cut (not in OpenAI's API; vLLM's).")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, description="Above 1 discourages repeats (vLLM's).")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = Field(None, description=f"Up to {MAX_STOP} strings that end generation.")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    user: Optional[str] = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="Go on past end-of-sequence tokens (vLLM's; for benchmarks).")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="Text, several texts, token ids, or several lists of token ids.")
    max_tokens: Optional[int] = Field(16, ge=1, description="Most tokens to generate (OpenAI's default 16).")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list")
        return value


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = Field(None, max_length=256)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: Optional[int] = Field(None, ge=1)
