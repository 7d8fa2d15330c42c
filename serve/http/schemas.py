"""Request bodies of the OpenAI-compatible endpoints (and of /v1/classify and /v1/ner), as pydantic models; FastAPI validates against them and
publishes them in /openapi.json (which the fuzz test generates requests from). And the one error body every
failure answers with, OpenAI's {"error": {"message", "type", "param", "code"}} (ApiError).

    curl -s 127.0.0.1:8000/openapi.json | python -m json.tool | less

Unknown fields are refused (extra="forbid"), so a client that asks for something this server does not do
(logit_bias, tools, ...) hears so instead of silently getting something else. The fields kept are
OpenAI's names and meanings, plus `top_k` and `repetition_penalty` as vLLM accepts them (the openai
client sends them with extra_body). Fields clients send with their default values (`"logprobs": false`,
`"response_format": {"type": "text"}`) take those values only (NO_OP): any other would change the answer in
a way this server does not do, and is refused naming the field.
"""

from __future__ import annotations

import json
from typing import Literal, Optional, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # OpenAI's own limit on stop sequences
MAX_CHOICES = 8
# The fields accepted with their no-op value alone, and what to say when another value is sent.
NO_OP = {"logprobs": "log probabilities are not returned; send false or null, or leave it out",
         "response_format": 'only {"type": "text"} (the default) is served; JSON modes and schemas are not'}


class Strict(BaseModel):
    # strict: a value is taken only as the type /openapi.json states; pydantic would otherwise read `true` as
    # 1 in a token list or "yes" as stream, serving a request the schema (and OpenAI) calls invalid.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(Strict):
    include_usage: bool = False
    """Send a last chunk with the token counts (choices empty), as OpenAI does."""


class ResponseFormat(Strict):
    type: Literal["text"]


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
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from each generated token's logit.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from a token's logit per time it "
                                     "was generated.")
    logprobs: Optional[bool] = Field(None, description="false or null only: " + NO_OP["logprobs"] + ".")
    response_format: Optional[ResponseFormat] = Field(None, description=NO_OP["response_format"] + ".")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:  # a bool (strict): the completions endpoint's count 0, which returns some, is refused as a type
            raise ValueError("true")
        return value

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


class Scoring(Strict):
    """Fields /v1/classify and /v1/ner share: the texts, and what to do with one longer than the model reads."""

    model: Optional[str] = Field(None, max_length=256, description="The served model's name (see /v1/models).")
    input: Union[str, list[str]] = Field(..., description="A text, or several (at most the server's --max-batch).")
    truncate: bool = Field(False, description="Cut a text longer than the model reads (else it is refused).")
    user: Optional[str] = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _input(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input is an empty list")
        return value


class ClassifyRequest(Scoring):
    text_pair: Union[str, list[str], None] = Field(
        None, description="The second text of each pair (entailment, paraphrase): one per input, as input is given.")
    top_k: Optional[int] = Field(None, ge=1, le=1_000_000, description="Labels listed per input, most likely first "
                                 "(default all).")

    @model_validator(mode="after")
    def _pairs(self):
        if self.text_pair is not None:
            if isinstance(self.input, str) != isinstance(self.text_pair, str):
                raise ValueError("text_pair must be a string when input is one, and a list when input is a list")
            if isinstance(self.input, list) and len(self.input) != len(self.text_pair):
                raise ValueError(f"text_pair has {len(self.text_pair)} texts for {len(self.input)} inputs; give one each")
        return self


class NerRequest(Scoring):
    """Entities are read per whitespace-separated word and returned as character offsets into each input."""


class AdapterLoad(Strict):
    """POST /v1/adapters: an adapter file (onnxruntime's format, as a multi-adapter export writes) to serve."""

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="What requests give as `model` to pick it.")
    path: str = Field(..., min_length=1, max_length=4096, description="The .onnx_adapter file, on the server.")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        # ASCII JSON: a field name the client sent with a lone surrogate in it must not fail to encode.
        return Response(json.dumps(body), status_code=self.status, headers=self.headers, media_type="application/json")


def validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
        if loc and loc[0] in NO_OP:
            parts.append(f"unsupported value for {loc[0]!r}: {NO_OP[loc[0]]}")
            loc = loc[:1]
        elif e.get("type") == "extra_forbidden":
            parts.append(f"unknown or unsupported field {'.'.join(loc)!r}")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
        param = param or (".".join(loc) or None)
    return "; ".join(dict.fromkeys(parts)) or "invalid request", param
