"""Optional API keys for the public API: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

With no key configured (the default) every route is open. With keys
(`IMGCLS_SERVE_API_KEYS`, comma-separated, and/or `IMGCLS_SERVE_API_KEYS_FILE`, one a
line), every route needs one of them except:

- `/livez` and `/readyz`: always open; an orchestrator's probe carries no secret, and they
  say only "up" and "ready";
- `/metrics`: open unless `IMGCLS_SERVE_PROTECT_PROBES=true` (Prometheus can send a
  bearer token; the counters name the classes and the served version);
- `/` (the page): open, it is a static file; what it asks for (/metadata, /predict,
  /explain) needs the key, which the page asks its user for when it gets a 401.

`/metadata` (classes, metrics, the registry's state) needs the key like the predictions do.
A missing or wrong key gets 401 in the error shape with `WWW-Authenticate: Bearer`.
Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key, so the
time taken says nothing about how much of a key was right or which key it was.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

from service.limits import error_response

if TYPE_CHECKING:
    from service.settings import ServiceSettings

logger = logging.getLogger(__name__)
Scope = dict[str, Any]
ALWAYS_OPEN = frozenset({"/livez", "/readyz", "/"})
PROBES = frozenset({"/metrics"})
CHALLENGE = 'Bearer realm="imgcls"'


def open_paths(protect_probes: bool) -> frozenset[str]:
    """The routes that need no key."""
    return ALWAYS_OPEN if protect_probes else ALWAYS_OPEN | PROBES


class KeyCheck:
    """Whether a presented key is one of the configured keys, in constant time."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __call__(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for known in self._digests:  # all of them, whichever matches
            matched |= hmac.compare_digest(digest, known)
        return matched


def presented_key(scope: Scope) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>`, else `X-API-Key`."""
    headers = {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", ())
    }
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip() or None


class ApiKeyMiddleware:
    """ASGI middleware: 401 for a request without a valid key, except on the open routes;
    with no key configured, it lets everything through."""

    def __init__(self, app: Any, settings: ServiceSettings) -> None:
        keys = settings.api_key_list()  # read when the server builds its app, not at import
        self.app, self.check, self.on = app, KeyCheck(keys), bool(keys)
        self.open = open_paths(settings.protect_probes)
        logger.info("API keys: %s", f"{len(keys)} configured" if keys else "none (every route is open)")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if not self.on or scope["type"] != "http" or scope["path"] in self.open:
            return await self.app(scope, receive, send)
        key = presented_key(scope)
        if key is not None and self.check(key):
            return await self.app(scope, receive, send)
        reason = (
            "missing API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            if key is None
            else "invalid API key"
        )
        await error_response(401, reason, headers={"WWW-Authenticate": CHALLENGE})(scope, receive, send)
