"""The public API in BentoML's own endpoint list, so BentoML's clients can call it.

`bentoml.SyncHTTPClient(url)` and `AsyncHTTPClient` learn a service's endpoints from its
`/schema.json`, which lists only `@bentoml.api` methods. The public routes are FastAPI
routes (they parse uploads themselves, so every client mistake gets a 4xx with a JSON
reason: service/service.py), so `PublicSchemaMiddleware` adds them to that list. Each
POST route of the FastAPI app with a form body becomes an endpoint named after its
path, its fields taken from the app's OpenAPI (uploads as BentoML's `file` type). The
client then posts the same multipart form that curl or the page sends, and gets the same
answers and the same errors: `client.predict(image=Path("cat.jpg"))`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
SCHEMA_PATH = "/schema.json"
# FastAPI documents a form with a list of uploads under this media type; it takes multipart.
URLENCODED = "application/x-www-form-urlencoded"


def public_endpoints(app: Any) -> list[dict[str, Any]]:
    """BentoML endpoint entries (name, route, input, output, doc) for the POST routes of a
    FastAPI `app` that take a form; each is named after its path (`/predict_batch`:
    `predict_batch`)."""
    spec = app.openapi()
    endpoints = []
    for path, operations in spec["paths"].items():
        operation = operations.get("post", {})
        content = operation.get("requestBody", {}).get("content", {})
        form = content.get("multipart/form-data") or content.get(URLENCODED)
        if form is None:
            continue
        fields = _resolved(spec, form["schema"])
        endpoints.append({
            "name": path.strip("/").replace("/", "_"),
            "route": path,
            "input": {
                "type": "object",
                "title": "Input",
                "properties": {name: _field(_resolved(spec, f)) for name, f in fields["properties"].items()},
                "required": fields.get("required", []),
            },
            "output": _output(operation),
            "doc": operation.get("description"),
        })  # fmt: skip
    return endpoints


def _resolved(spec: dict, schema: dict) -> dict:
    """`schema`, or what its `$ref` points to in the spec's components."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _is_upload(schema: dict) -> bool:
    return schema.get("format") == "binary" or "contentMediaType" in schema


def _field(schema: dict) -> dict:
    """A form field in BentoML's terms: an upload is a `file`, a list of them an array of
    `file`s; anything else keeps its JSON schema."""
    if _is_upload(schema):
        return {"type": "file", "format": "binary", "title": schema.get("title")}
    items = schema.get("items", {})
    if schema.get("type") == "array" and _is_upload(items):
        return {"type": "array", "items": {"type": "file", "format": "binary"}, "title": schema.get("title")}
    return schema


def _output(operation: dict) -> dict:
    """JSON answers are objects; any other media type (the /explain PNG) comes back as a file."""
    content = operation.get("responses", {}).get("200", {}).get("content", {})
    if not content or "application/json" in content:
        return {"type": "object"}
    return {"type": "file", "format": "binary", "content_type": next(iter(content))}


class PublicSchemaMiddleware:
    """Adds `public_endpoints(page)` to the routes of BentoML's `GET /schema.json`."""

    def __init__(self, app: Any, page: Any) -> None:
        self.app, self.page = app, page
        self._endpoints: list[dict] | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != SCHEMA_PATH or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        messages: list[dict] = []

        async def keep(message: dict) -> None:
            messages.append(message)

        await self.app(scope, receive, keep)
        if not messages:
            return
        start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
        if start["status"] == 200:
            try:
                body = self._with_public_routes(body)
            except Exception:  # noqa: BLE001 - BentoML's own schema still answers
                logger.exception("the public routes could not be added to %s", SCHEMA_PATH)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})

    def _with_public_routes(self, body: bytes) -> bytes:
        schema = json.loads(body)
        if self._endpoints is None:
            self._endpoints = public_endpoints(self.page)
        schema["routes"] = [*schema.get("routes", []), *self._endpoints]
        return json.dumps(schema).encode()
