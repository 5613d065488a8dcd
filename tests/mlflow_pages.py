"""What a team sees in the MLflow UI, read by Debian's headless chromium from the React UI's
rendered DOM. `check_registry_pages` takes any server's base URL, so the same check runs
against `imgcls ui` and against a team `mlflow server` (PostgreSQL, S3)."""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path


def page_dom(url: str, profile: Path, auth: tuple[str, str] | None = None, until: str | None = None) -> str:
    """The DOM of a page after chromium ran its scripts (headless), without scripts and styles.

    `auth` (user, password) logs in to a basic-auth server: every request of the page,
    its own API calls included, carries the login (DevTools' extra HTTP headers); the DOM
    is read once the text `until` shows (else once a table or an error has rendered).
    """
    if auth is not None:
        return _strip_scripts(_dom_with_login(url, profile, auth, until))
    from tests.registry_fixtures import chromium

    out = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return _strip_scripts(out)


def _strip_scripts(dom: str) -> str:
    return re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)


# What the MLflow UI shows once a registry page has loaded its data (or failed to).
_LOADED = "document.querySelector('table, [role=alert]') !== null || document.body.innerText.includes('rror')"


def _dom_with_login(url: str, profile: Path, auth: tuple[str, str], until: str | None) -> str:
    import base64

    from tests.browser import Chromium

    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    with Chromium(profile) as page:
        page.call("Network.enable")
        page.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {token}"})
        page.call("Page.enable")
        page.call("Page.navigate", url=url)
        shown = f"document.body.innerText.includes({json.dumps(until)})" if until else _LOADED
        page.wait_for(f"document.readyState === 'complete' && ({shown})", timeout=60)
        return page.evaluate("document.documentElement.outerHTML")


def visible_text(dom: str) -> str:
    """The text of a DOM dump, tags removed, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def page_text(url: str, profile: Path) -> str:
    """The visible text of a page after chromium ran its scripts."""
    return visible_text(page_dom(url, profile))


def _cells(dom: str, tag: str) -> list[str]:
    """The text of every `<th>` or `<td>` in a DOM dump."""
    return [visible_text(c) for c in re.findall(rf"<{tag}\b[^>]*>(.*?)</{tag}>", dom, flags=re.S)]


def table_rows(dom: str) -> list[list[str]]:
    """The cells' text of every table row (`<tr>`) in a DOM dump."""
    return [_cells(row, "td") for row in re.findall(r"<tr\b[^>]*>(.*?)</tr>", dom, flags=re.S)]


def check_registry_pages(
    base_url: str,
    model_name: str,
    profile: Path,
    alias: str = "champion",
    auth: tuple[str, str] | None = None,
) -> None:
    """Assert that the MLflow UI at `base_url` renders imgcls's descriptions of `model_name`:
    on the model page the champion line and the alias-moves table, on the champion's version
    page its card (metrics, promotion reason) and the link to its run. `auth`: a login of a
    basic-auth server (the API calls below then need MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    from mlflow import MlflowClient

    from registry.history import MOVE_PREFIX

    client = MlflowClient(tracking_uri=base_url, registry_uri=base_url)
    champion = client.get_model_version_by_alias(model_name, alias)
    tags = client.get_registered_model(model_name).tags
    newest = max(int(k.removeprefix(MOVE_PREFIX)) for k in tags if k.startswith(MOVE_PREFIX))

    line = f"{alias.capitalize()}: version {champion.version}"
    dom = page_dom(f"{base_url}/#/models/{model_name}", profile / "model", auth, until=line)
    text = visible_text(dom)
    assert f"{alias.capitalize()}: version {champion.version}" in text, text[:3000]
    assert "**" not in text and "|---|" not in text, "the description is shown as raw Markdown"
    assert "gate: candidate vs champion" in _cells(dom, "th"), _cells(dom, "th")
    row = f"→ {champion.version}"
    assert any(cell.endswith(row) for cell in _cells(dom, "td")), _cells(dom, "td")[:40]
    assert str(newest) in _cells(dom, "td")  # the newest move's number, first column

    version_page = f"{base_url}/#/models/{model_name}/versions/{champion.version}"
    dom = page_dom(version_page, profile / "version", auth, until="weakest classes (recall)")
    cells = _cells(dom, "td")
    assert "test macro-F1" in cells and "weakest classes (recall)" in cells, cells[:40]
    assert f"{alias} now" in visible_text(dom) and "Promotion:" in visible_text(dom)
    run = client.get_run(champion.run_id)
    assert f'href="#/experiments/{run.info.experiment_id}/runs/{champion.run_id}"' in dom
