"""Headless Debian chromium driven over the DevTools protocol: the page tests' browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from imgcls.processes import free_port


class Chromium:
    """Headless chromium driven over the DevTools protocol (a tiny CDP client)."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen | None = None
        self._ids = iter(range(1, 1_000_000))

    def __enter__(self) -> Chromium:
        from httpx_ws import connect_ws

        require_chromium()
        port = free_port()
        cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        cmd += [f"--remote-debugging-port={port}", f"--user-data-dir={self.profile}"]
        self.proc = subprocess.Popen([*cmd, "about:blank"], stderr=subprocess.DEVNULL)
        target = self._page_target(f"http://127.0.0.1:{port}")
        self._client = httpx.Client()
        self._ws_cm = connect_ws(target["webSocketDebuggerUrl"], self._client)
        self.ws = self._ws_cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ws_cm.__exit__(*exc)
        self._client.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def _page_target(self, base: str) -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                targets = httpx.get(f"{base}/json/list", timeout=2).json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, **params) -> dict:
        """Send one CDP command and return its result (events in between are skipped)."""
        call_id = next(self._ids)
        self.ws.send_text(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive_text(timeout=30))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def upload(self, image: Path) -> None:
        """Give the page's file input `image` and wait until its answer is shown."""
        doc = self.call("DOM.getDocument")
        node = self.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
        self.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(image)])
        self.wait_for("document.getElementById('top-label').dataset.state === 'done'")

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return
            time.sleep(0.2)
        errors = self.evaluate("document.getElementById('error')?.textContent")
        raise TimeoutError(f"page never satisfied {expression!r} (page error: {errors!r})")


def require_chromium() -> None:
    """Skip on a laptop without chromium; fail under CI=true, where `make test` installs it
    (a skipped page test would hide a broken install)."""
    if shutil.which("chromium") is not None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("chromium is not installed (make browser installs it)", pytrace=False)
    pytest.skip("no chromium (make browser installs it)")
