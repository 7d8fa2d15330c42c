"""The server's API key: `Authorization: Bearer KEY` on /v1/*, and what /health tells a caller without it.

    LITE_SFT_API_KEY=... lite-sft serve exports/qwen      # the environment, not argv, which `ps` shows to all
    curl -s 127.0.0.1:8000/v1/models -H "Authorization: Bearer $LITE_SFT_API_KEY"

A missing or wrong key is a 401 with `WWW-Authenticate: Bearer` (RFC 6750's challenge). Keys are compared as
bytes, so a key with non-ASCII characters is its UTF-8 bytes, as curl sends it.
"""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from .schemas import ApiError

BEARER = HTTPBearer(auto_error=False)


class ApiKey:
    """`key` (None: no key, every caller is let in). `require` is the dependency of the routes that need it."""

    def __init__(self, key: str | None):
        # The key as the bytes a client sends for it; a key from argv or the environment whose bytes are not
        # UTF-8 (Python holds those as surrogate escapes) becomes those very bytes again.
        self.key = key.encode("utf-8", "surrogateescape") if key else None

    def matches(self, sent: str | None) -> bool:
        """Whether `sent` (the token after `Bearer `, as Starlette decoded it) is the key; any is without one."""
        if self.key is None:
            return True
        # Starlette decodes header bytes as latin-1, so encoding back gives the bytes the client sent; compared
        # as bytes, since compare_digest refuses str holding anything but ASCII (a TypeError, so a 500).
        return sent is not None and secrets.compare_digest(sent.encode("latin-1"), self.key)

    def require(self, credentials: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> None:
        if not self.matches(credentials.credentials if credentials else None):
            raise ApiError(401, "missing or incorrect API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def caller_has_it(self, request: Request) -> bool:
        """For a route everyone may call, which tells the key's holders more (it declares no security scheme:
        the key is not required there)."""
        scheme, sent = get_authorization_scheme_param(request.headers.get("authorization"))
        return self.matches(sent if scheme.lower() == "bearer" else None)

    def routes(self) -> list:
        """The dependencies of a route that needs the key: none without one, so that only a server with a key
        declares one in its OpenAPI schema (the schema describes this server as it runs)."""
        return [Depends(self.require)] if self.key is not None else []
