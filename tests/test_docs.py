"""The docs site builds in strict mode: every warning (a broken link, a missing `#anchor`,
a page left out of the toctree, bad MyST) fails it, the README's links included (docs/index.md
includes README.md). A copy with one broken anchor and a copy with a page left out must fail,
so the check is known to bite. External http(s) links are not checked (no network)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_site(docs: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`make docs`'s build of `docs` into `out`: fresh environment, warnings as errors, nitpicky."""
    command = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-n", "-q", "-b", "html"]
    return subprocess.run(
        [*command, str(docs), str(out)], capture_output=True, text=True, timeout=120, check=False
    )


def copy_docs(dest: Path) -> Path:
    """README.md and docs/ (without a build folder) under `dest`, laid out as in the checkout."""
    shutil.copy(ROOT / "README.md", dest / "README.md")
    shutil.copytree(ROOT / "docs", dest / "docs", ignore=shutil.ignore_patterns("_build"))
    return dest / "docs"


def test_site_builds_without_a_warning(tmp_path):
    result = build_site(ROOT / "docs", tmp_path / "html")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    index = (tmp_path / "html" / "index.html").read_text()
    # The README is part of the site, so its links were checked too.
    assert all(heading in index for heading in ("Two commands", "Four everyday commands", "The loop"))
    pages = {path.stem for path in (ROOT / "docs").glob("*.md")}
    assert pages >= {"index", "training", "registry", "serving", "teams", "operations", "benchmarks"}
    assert all((tmp_path / "html" / f"{page}.html").is_file() for page in pages)


def test_a_broken_anchor_or_a_page_left_out_fails_the_build(tmp_path):
    docs = copy_docs(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "(docs/registry.md)" in readme
    (tmp_path / "README.md").write_text(
        readme.replace("(docs/registry.md)", "(docs/registry.md#no-such-heading)")
    )
    (docs / "orphan.md").write_text("# A page nobody links\n")
    result = build_site(docs, tmp_path / "html")
    assert result.returncode != 0
    assert "local id not found in doc 'registry': 'no-such-heading'" in result.stderr, result.stderr
    assert "orphan.md: WARNING: document isn't included in any toctree" in result.stderr, result.stderr
