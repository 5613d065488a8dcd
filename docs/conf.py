"""Sphinx settings for the imgcls site: `make docs` builds it into docs/_build/html.

The pages are Markdown (MyST). `tests/test_docs.py` builds the site with warnings as
errors, so a broken link, a missing `#anchor` or a page left out of the toctree fails it.
"""

project = "imgcls"
author = "imgcls"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# `[text](page.md#heading)` links resolve to headings down to level 4, GitHub's slugs, so
# the same links work on GitHub and in the site (and a wrong one is a warning).
myst_heading_anchors = 4
# Every link to a page or an anchor is checked; a link to a URL is left alone.
myst_enable_extensions = ["colon_fence"]
suppress_warnings: list[str] = []

html_theme = "furo"
html_title = "imgcls"
