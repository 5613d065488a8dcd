"""API keys against the real server: with keys set, every route but the probes and the page
needs one (401 in the error shape with WWW-Authenticate); `imgcls serve --api-keys-file
--protect-probes` puts /metrics behind them too."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from imgcls.processes import ServerProcess, free_port
from service.access import KeyCheck, presented_key
from service.settings import read_keys
from tests.browser import Chromium
from tests.service_fixtures import (
    colour_image,
    copy_store,
    encode,
    service_env,
    tiny_model_server,
)

INLINE_KEY = "inline-key-0123456789"
FILE_KEY = "file-key-abcdefghij"
RED = encode(colour_image("red"), "PNG")
PROTECTED = [
    ("POST", "/predict"),
    ("POST", "/predict_batch"),
    ("POST", "/explain"),
    ("GET", "/metadata"),
    ("GET", "/api/docs"),
    ("GET", "/api/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/schema.json"),
    ("GET", "/nope"),  # no key, no route discovery: 401 before 404
]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_store) -> str:
    """A real server with one key inline and one from a keys file; its base URL."""
    home = tmp_path_factory.mktemp("keyed_home")
    keys = home / "keys.txt"
    keys.write_text(f"# the team's keys\n{FILE_KEY}\n\n")
    with tiny_model_server(home, tiny_store, api_keys=INLINE_KEY, api_keys_file=keys) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory, tiny_store) -> str:
    """`imgcls serve --api-keys-file F --protect-probes` on the tiny model; its base URL."""
    home = tmp_path_factory.mktemp("cli_home")
    keys = home / "keys.txt"
    keys.write_text(FILE_KEY + "\n")
    env = service_env(copy_store(tiny_store, home))
    port = free_port()
    cmd = [sys.executable, "-m", "imgcls.cli", "serve", "--port", str(port), "--api-keys-file", str(keys)]
    cmd.append("--protect-probes")
    root = Path(__file__).resolve().parents[1]
    ready = f"http://127.0.0.1:{port}/readyz"
    with ServerProcess(cmd, ready, home / "server.log", env=env, cwd=root, port=port, timeout_s=150) as srv:
        yield srv.url


def assert_unauthorized(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer realm="imgcls"'
    body = response.json()
    assert reason in body["error"] and body["request_id"] == response.headers["x-request-id"]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[p for _, p in PROTECTED])
def test_without_a_key_the_api_answers_401(keyed_server, method, path):
    assert_unauthorized(httpx.request(method, f"{keyed_server}{path}"), "missing API key")


@pytest.mark.slow
def test_probes_metrics_and_the_page_stay_open(keyed_server):
    for path in ("/livez", "/readyz", "/metrics", "/"):
        assert httpx.get(f"{keyed_server}{path}").status_code == 200, path


@pytest.mark.slow
def test_a_wrong_key_is_refused_and_either_key_in_either_header_works(keyed_server):
    files = {"image": ("red.png", RED)}
    wrong = httpx.post(f"{keyed_server}/predict", files=files, headers={"X-API-Key": INLINE_KEY + "x"})
    assert_unauthorized(wrong, "invalid API key")
    basic = httpx.post(
        f"{keyed_server}/predict", files=files, headers={"Authorization": f"Basic {INLINE_KEY}"}
    )
    assert_unauthorized(basic, "missing API key")
    for headers in (
        {"Authorization": f"Bearer {INLINE_KEY}"},
        {"X-API-Key": INLINE_KEY},
        {"authorization": f"bearer {FILE_KEY}"},
        {"X-API-Key": FILE_KEY},
    ):
        response = httpx.post(f"{keyed_server}/predict", files=files, headers=headers, timeout=30)
        assert response.status_code == 200, (headers, response.text)
        assert response.json()["predictions"][0]["label"] == "red"
    meta = httpx.get(f"{keyed_server}/metadata", headers={"X-API-Key": FILE_KEY})
    assert meta.status_code == 200 and meta.json()["version"] == "7"


@pytest.mark.slow
def test_the_cli_reads_keys_from_a_file_and_protects_metrics(cli_server):
    assert httpx.get(f"{cli_server}/livez").status_code == 200
    assert httpx.get(f"{cli_server}/readyz").status_code == 200
    assert_unauthorized(httpx.get(f"{cli_server}/metrics"), "missing API key")
    assert (
        httpx.get(f"{cli_server}/metrics", headers={"Authorization": f"Bearer {FILE_KEY}"}).status_code == 200
    )
    assert_unauthorized(httpx.get(f"{cli_server}/metadata", headers={"X-API-Key": INLINE_KEY}), "invalid")
    ok = httpx.post(f"{cli_server}/predict", files={"image": ("r.png", RED)}, headers={"X-API-Key": FILE_KEY})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "red"


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_asks_for_the_key_and_then_classifies(keyed_server, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(RED)
    with Chromium(tmp_path / "profile") as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"{keyed_server}/")
        page.wait_for("!!document.getElementById('key-form') && !document.getElementById('key-form').hidden")
        page.evaluate(
            f"document.getElementById('key').value = '{FILE_KEY}';"
            "document.getElementById('key-form').requestSubmit(); true"
        )
        page.wait_for("document.getElementById('model').textContent.includes('image-classifier v7')")
        page.upload(image)
        assert page.evaluate("document.getElementById('top-label').textContent") == "red"


def test_keys_come_from_the_string_and_the_file(tmp_path):
    file = tmp_path / "keys"
    file.write_text("# comment\n k2 \n\nk1\n")
    assert read_keys(" k1, ,k3", file) == ("k1", "k3", "k2")
    assert read_keys(None, None) == ()


def test_key_check_and_the_headers_it_reads():
    check = KeyCheck(("alpha", "beta-longer-key"))
    assert check("alpha") and check("beta-longer-key")
    assert not check("alph") and not check("alphaa") and not check("")
    assert presented_key({"headers": [(b"authorization", b"Bearer  tok ")]}) == "tok"
    assert presented_key({"headers": [(b"x-api-key", b"k")]}) == "k"
    assert presented_key({"headers": [(b"authorization", b"Token x")]}) is None
