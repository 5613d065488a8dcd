"""A corpus of malformed and wrong requests against the real server: everything the app sees
is answered in the error shape, `{"error": ..., "request_id": ...}` with the same ID in
`X-Request-ID`; what uvicorn's parser refuses (bad request lines, bad headers, bad chunked
framing) gets uvicorn's own plain 400. Afterwards a good image gets the same answer."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.service_fixtures import (
    colour_image,
    encode,
    tiny_model_server,
)

pytestmark = pytest.mark.slow
MAX_UPLOAD = 200_000
PNG = encode(colour_image("green"), "PNG")
# What uvicorn (httptools) answers a request its parser refuses; the app never sees it.
PARSER_REFUSAL = b"Invalid HTTP request received."
# How long a client waits for an answer: every answer comes well within ANSWER_S; where no
# answer is due (a body that never comes), the client gives up sooner, after GIVE_UP_S.
ANSWER_S = 5
GIVE_UP_S = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_store) -> tuple[str, int, Path]:
    """A real server on the tiny model whose heatmaps fail (a real 5xx); its URL, port, log."""
    home = tmp_path_factory.mktemp("malformed_home")
    with tiny_model_server(
        home, tiny_store, hooks={"heatmap": "fail"}, max_upload_bytes=MAX_UPLOAD, max_batch_images=4
    ) as srv:
        yield srv.url, srv.port, home / "server.log"


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    """A multipart/form-data body of (field, filename or None, content) parts."""
    out = b""
    for field, filename, content in parts:
        disposition = f'form-data; name="{field}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    """One HTTP/1.1 request (Connection: close) with a Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(method: str, path: str, chunks: bytes, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close", "Transfer-Encoding: chunked"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunks


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


MP = "multipart/form-data; boundary=b0undary"
IMAGE_PART_HEAD = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
# (id, bytes to send, statuses expected in order: an int for an answer of the app, "parser"
# for uvicorn's refusal). Requests whose framing breaks HTTP itself come first.
RAW = [
    ("garbage-line", b"HELLO\r\n\r\n", ["parser"]),
    ("unknown-method", request("BREW", "/predict"), ["parser"]),
    ("bad-version", b"GET /predict HTTP/9.9\r\nHost: t\r\n\r\n", ["parser"]),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n", ["parser"]),
    ("control-char-in-target", b"GET /\x01 HTTP/1.1\r\nHost: t\r\n\r\n", ["parser"]),
    ("header-without-colon", b"GET / HTTP/1.1\r\nHost t\r\n\r\n", ["parser"]),
    ("space-in-header-name", b"GET / HTTP/1.1\r\nHo st: t\r\n\r\n", ["parser"]),
    ("nul-in-header-value", b"GET / HTTP/1.1\r\nHost: t\x00x\r\n\r\n", ["parser"]),
    ("bare-lf-folding", b"GET / HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n", ["parser"]),
    ("negative-length", b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", ["parser"]),
    ("non-numeric-length", b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: ab\r\n\r\n", ["parser"]),
    (
        "two-lengths",
        b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        ["parser"],
    ),
    (
        "length-and-chunked",
        b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ["parser"],
    ),
    ("bad-chunk-size", chunked("POST", "/predict", b"zz\r\nabc\r\n0\r\n\r\n", Content_Type=MP), ["parser"]),
    ("chunk-without-crlf", chunked("POST", "/predict", b"3\r\nabcdef0\r\n\r\n", Content_Type=MP), ["parser"]),
    ("unknown-transfer-coding", request("POST", "/predict", Transfer_Encoding="gzip, zip"), ["parser"]),
    # Framing that parses: the app sees the request and answers it in the error shape.
    ("http10-no-host", b"GET /nope HTTP/1.0\r\n\r\n", [404]),
    ("http11-no-host", b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n", [404]),
    ("absolute-uri", request("GET", "http://elsewhere.example/nope"), [404]),
    ("percent-garbage-path", request("GET", "/%zz%00"), [404]),
    ("long-path", request("GET", "/" + "a" * 8000), [404]),
    ("no-version", b"GET /predict\r\n\r\n", [405]),  # taken as HTTP/0.9
    ("options", request("OPTIONS", "/predict"), [405]),
    ("trace", request("TRACE", "/explain"), [405]),
    ("query-garbage", request("GET", "/predict?%%%&&=="), [405]),
    (
        "length-shorter-than-body",
        request("POST", "/predict", b"x" * 10, Content_Type=MP)[:-5] + b"JUNK\r\n\r\n",
        [400],
    ),
    (
        "pipelined-then-garbage",
        request("GET", "/nope").replace(b"Connection: close\r\n", b"") + b"NOT HTTP AT ALL\r\n\r\n",
        ["parser"],  # the parser refuses the buffer before the first request runs
    ),
    (
        "body-over-limit-declared",
        request("POST", "/predict", bytes(MAX_UPLOAD + 1), Content_Type=MP),
        [413],
    ),
    (
        "chunked-over-limit",
        chunked(
            "POST",
            "/predict",
            chunk(IMAGE_PART_HEAD + bytes(MAX_UPLOAD + 10)) + b"0\r\n\r\n",
            Content_Type=MP,
        ),
        [413],
    ),
    (
        "lying-length-then-half-close",
        request("POST", "/predict", IMAGE_PART_HEAD + PNG, Content_Type=MP).replace(
            f"Content-Length: {len(IMAGE_PART_HEAD + PNG)}".encode(), b"Content-Length: 90000"
        ),
        [],  # the body never comes: the client gives up, and there is no one to answer
    ),
    (
        "lying-length-keep-alive",
        request("POST", "/predict", IMAGE_PART_HEAD + PNG, Content_Type=MP)
        .replace(b"Connection: close\r\n", b"")
        .replace(f"Content-Length: {len(IMAGE_PART_HEAD + PNG)}".encode(), b"Content-Length: 100")
        + b"\r\n",
        ["parser"],  # the bytes after the declared 100 are not HTTP: the buffer is refused
    ),
    (
        "chunked-garbage-multipart",
        chunked("POST", "/predict", chunk(b"not multipart") + b"0\r\n\r\n", Content_Type=MP),
        [400],
    ),
    ("multipart-no-boundary", request("POST", "/predict", b"abc", Content_Type="multipart/form-data"), [400]),
    (
        "multipart-unterminated",
        request(
            "POST",
            "/predict",
            b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + PNG,
            Content_Type=MP,
        ),
        [400],
    ),
    (
        "multipart-part-without-disposition",
        request("POST", "/predict", b"--b0undary\r\n\r\nabc\r\n--b0undary--\r\n", Content_Type=MP),
        [400],
    ),
    (
        "multipart-huge-part-header",
        request(
            "POST",
            "/predict",
            b"--b0undary\r\nX-Pad: " + b"p" * 100_000 + b"\r\n\r\nabc\r\n--b0undary--\r\n",
            Content_Type=MP,
        ),
        [400],
    ),
    (
        "urlencoded-garbage",
        request("POST", "/predict", b"%%%=&&", Content_Type="application/x-www-form-urlencoded"),
        [400],
    ),
    ("json-body", request("POST", "/predict", b'{"image": "abc"}', Content_Type="application/json"), [400]),
    (
        "charset-garbage",
        request("POST", "/predict", b"abc", Content_Type="multipart/form-data; boundary=\x7f\x7f"),
        ["parser"],
    ),
]


def exchange(port: int, data: bytes, timeout_s: float = ANSWER_S) -> bytes:
    """Send raw bytes, then read until the server closes the connection (or the timeout,
    after which the client closes its side, as one that gives up would)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered before it read all
            sock.sendall(data)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                got = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not got:
                break
            received += got
    return received


def split_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of each HTTP/1.1 response in `data`, in order."""
    responses = []
    while data.startswith(b"HTTP/1."):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", len(rest)))
        if status == 100:
            length = 0
        body, data = rest[:length], rest[length:]
        if status != 100:
            responses.append((status, headers, body))
    return responses


def assert_error_shape(status: int, headers: dict[str, str], body: bytes) -> dict:
    """The service's error shape: JSON `error`, and `request_id` equal to X-Request-ID."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    data = json.loads(body)
    assert isinstance(data.get("error"), str) and data["error"], data
    assert data["request_id"] == headers["x-request-id"], (data, headers)
    return data


@pytest.mark.parametrize(("data", "expected"), [(d, e) for _, d, e in RAW], ids=[i for i, _, _ in RAW])
def test_raw_malformed_requests(server, data, expected):
    _, port, _ = server
    responses = split_responses(exchange(port, data, ANSWER_S if expected else GIVE_UP_S))
    assert [s if "x-request-id" in h else "parser" for s, h, _ in responses] == expected, responses
    for status, headers, body in responses:
        if "x-request-id" in headers:
            assert_error_shape(status, headers, body)
        else:  # refused by uvicorn's parser before any application saw it
            assert status == 400 and PARSER_REFUSAL in body, (status, body)


def _form_fields(n: int) -> bytes:
    return multipart([(f"f{i}", None, b"x") for i in range(n)])


# (id, method, path, httpx keyword arguments, status, a part of the error text)
WRONG = [
    ("get-predict", "GET", "/predict", {}, 405, "method GET is not allowed on /predict"),
    ("get-predict-batch", "GET", "/predict_batch", {}, 405, "not allowed"),
    ("put-explain", "PUT", "/explain", {}, 405, "not allowed"),
    ("delete-metadata", "DELETE", "/metadata", {}, 405, "not allowed"),
    ("post-livez", "POST", "/livez", {}, 405, "POST /livez"),
    ("post-metrics", "POST", "/metrics", {}, 405, "POST /metrics"),
    ("unknown-route", "GET", "/nope", {}, 404, "GET /nope"),
    ("unknown-nested-route", "POST", "/predict/extra", {}, 404, "not found"),
    ("no-body", "POST", "/predict", {}, 400, "missing form field 'image'"),
    ("json-instead-of-form", "POST", "/predict", {"json": {"image": "x"}}, 400, "missing form field"),
    ("wrong-field", "POST", "/predict", {"files": {"picture": ("a.png", PNG)}}, 400, "field 'image'"),
    ("image-as-text-field", "POST", "/predict", {"data": {"image": "abc"}}, 400, "image"),
    (
        "top-k-zero",
        "POST",
        "/predict",
        {"files": {"image": ("a.png", PNG)}, "data": {"top_k": "0"}},
        400,
        "top_k",
    ),
    (
        "top-k-text",
        "POST",
        "/predict",
        {"files": {"image": ("a.png", PNG)}, "data": {"top_k": "many"}},
        400,
        "top_k",
    ),
    (
        "top-k-huge",
        "POST",
        "/predict",
        {"files": {"image": ("a.png", PNG)}, "data": {"top_k": "99999"}},
        400,
        "top_k",
    ),
    ("not-an-image", "POST", "/predict", {"files": {"image": ("a.png", b"hello")}}, 400, "not an image"),
    ("empty-image", "POST", "/predict", {"files": {"image": ("a.png", b"")}}, 400, "empty upload"),
    (
        "ico",
        "POST",
        "/predict",
        {"files": {"image": ("a.ico", encode(colour_image("red"), "ICO"))}},
        415,
        "ICO",
    ),
    ("batch-without-images", "POST", "/predict_batch", {"data": {"x": "1"}}, 400, "images"),
    (
        "batch-too-many",
        "POST",
        "/predict_batch",
        {"files": [("images", ("a.png", PNG))] * 6},
        400,
        "too many images",
    ),
    (
        "multipart-without-boundary",
        "POST",
        "/predict",
        {"content": b"abc", "headers": {"content-type": "multipart/form-data"}},
        400,
        "boundary",
    ),
    (
        "too-many-fields",
        "POST",
        "/predict",
        {"content": _form_fields(1001), "headers": {"content-type": MP}},
        400,
        "Too many fields",
    ),
    (
        "long-filename",
        "POST",
        "/predict",
        {"files": {"image": ("n" * 10_000 + ".png", b"hello")}},
        400,
        "multipart",
    ),
    (
        "over-the-byte-limit",
        "POST",
        "/predict",
        {"files": {"image": ("a.png", bytes(MAX_UPLOAD + 1))}},
        413,
        "over the limit",
    ),
    ("explain-not-an-image", "POST", "/explain", {"files": {"image": ("a.gif", b"GIF89a")}}, 400, "image"),
    (
        "explain-fails-in-the-model",
        "POST",
        "/explain",
        {"files": {"image": ("a.png", PNG)}},
        500,
        "the model process failed",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "reason"),
    [case[1:] for case in WRONG],
    ids=[case[0] for case in WRONG],
)
def test_wrong_requests_get_the_error_shape(server, method, path, kwargs, status, reason):
    url, _, log = server
    response = httpx.request(method, f"{url}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    data = assert_error_shape(response.status_code, dict(response.headers), response.content)
    assert reason in data["error"], data
    assert data["request_id"] in _wait_for_log(log, data["request_id"])


def test_a_sane_client_request_id_is_kept_and_an_insane_one_replaced(server):
    url, _, _ = server
    kept = httpx.get(f"{url}/nope", headers={"X-Request-ID": "client-7f3a.1"})
    assert kept.headers["x-request-id"] == "client-7f3a.1" == kept.json()["request_id"]
    replaced = httpx.get(f"{url}/nope", headers={"X-Request-ID": "x" * 500})
    assert replaced.headers["x-request-id"] != "x" * 500
    assert replaced.json()["request_id"] == replaced.headers["x-request-id"]
    ok = httpx.get(f"{url}/livez")
    assert ok.status_code == 200 and ok.headers["x-request-id"]  # successes carry one too


def test_the_corpus_leaves_the_answer_to_a_good_image_unchanged(server):
    url, port, _ = server
    before = _predict(url)
    for _, data, expected in RAW:
        exchange(port, data, ANSWER_S if expected else GIVE_UP_S)
    for _, method, path, kwargs, _, _ in WRONG:
        httpx.request(method, f"{url}{path}", timeout=30, **kwargs)
    after = _predict(url)
    assert after == before and before["predictions"][0]["label"] == "green"


def _predict(url: str) -> dict:
    response = httpx.post(f"{url}/predict", files={"image": ("g.png", PNG)}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for_log(log: Path, text: str, timeout_s: float = 10) -> str:
    """The server log once it mentions `text` (log lines are flushed a little later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {log}")
