"""The abstain threshold: a real `bentoml serve --min-confidence`, real HTTP, /metrics;
`imgcls predict --min-confidence` on real files."""

from __future__ import annotations

import csv

import httpx
import numpy as np
import pytest

from imgcls.cli import build_parser
from service.abstain import abstention
from service.cli import settings_env
from service.store import save_to_bento_store
from tests.browser import Chromium
from tests.service_fixtures import colour_image, encode, save_tiny_model, tiny_card, tiny_model_server

# A grey image excites none of the tiny model's colour filters: 1/3 for each class.
GREY = encode(np.full((40, 40, 3), 128, np.uint8), "PNG")
RED = encode(colour_image("red"), "PNG")


def _abstentions(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("imgcls_abstentions_total"))


@pytest.fixture(scope="module")
def abstaining_server(tmp_path_factory, tiny_store) -> str:
    """A real server of the tiny model with `--min-confidence 0.5`; its base URL."""
    folder = tmp_path_factory.mktemp("abstain")
    with tiny_model_server(folder / "home", tiny_store, min_confidence=0.5) as srv:
        yield srv.url


@pytest.mark.slow
def test_answers_below_the_threshold_abstain_list_the_top_k_and_are_counted(abstaining_server):
    url = abstaining_server
    counted = _abstentions(url)
    unsure = httpx.post(f"{url}/predict", files={"image": ("grey.png", GREY)}, timeout=30).json()
    assert unsure["abstained"] is True and unsure["label"] is None
    assert len(unsure["predictions"]) == 3
    assert unsure["predictions"][0]["probability"] == pytest.approx(1 / 3, abs=1e-3)
    sure = httpx.post(f"{url}/predict", files={"image": ("red.png", RED)}, timeout=30).json()
    assert sure["abstained"] is False and sure["label"] == "red" == sure["predictions"][0]["label"]
    files = [("images", ("a.png", RED)), ("images", ("b.png", GREY))]
    batch = httpx.post(f"{url}/predict_batch", files=files, timeout=30).json()
    assert [(r["abstained"], r["label"]) for r in batch["results"]] == [(False, "red"), (True, None)]
    assert all(len(r["predictions"]) == 3 for r in batch["results"])
    assert _abstentions(url) - counted == 2  # one of /predict, one of /predict_batch


def test_abstention_is_off_by_default_and_the_option_becomes_the_variable():
    predictions = [{"label": "red", "probability": 0.4}, {"label": "blue", "probability": 0.35}]
    assert abstention(predictions, None) == {}
    assert abstention(predictions, 0.4) == {"abstained": False, "label": "red"}
    assert abstention(predictions, 0.41) == {"abstained": True, "label": None}
    args = build_parser().parse_args(["serve", "--min-confidence", "0.7"])
    assert settings_env(args)["IMGCLS_SERVE_MIN_CONFIDENCE"] == "0.7"
    assert "IMGCLS_SERVE_MIN_CONFIDENCE" not in settings_env(build_parser().parse_args(["serve"]))


def test_imgcls_predict_marks_the_files_it_abstains_on(tmp_path, capsys):
    labels = {"alias": "champion", "registered_model": "image-classifier"}
    save_to_bento_store(save_tiny_model(tmp_path), tiny_card(), "image-classifier", 4, labels)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "grey.png").write_bytes(GREY)
    (folder / "red.png").write_bytes(RED)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "p.csv"
    args = build_parser().parse_args(
        ["predict", "--data", str(folder), "--out", str(out), "--min-confidence", "0.5"]
    )
    assert args.func(args) == 0
    with open(out, newline="") as file:
        rows = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(file)}
    assert [(n, r["abstained"], r["label_1"]) for n, r in sorted(rows.items())] == [
        ("grey.png", "true", rows["grey.png"]["label_1"]),
        ("notes.txt", "", ""),
        ("red.png", "false", "red"),
    ]
    assert "abstained on 1 image(s)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_says_when_the_model_is_not_sure(abstaining_server, tmp_path):
    image = tmp_path / "grey.png"
    image.write_bytes(GREY)
    with Chromium(tmp_path / "profile") as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"{abstaining_server}/")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        page.upload(image)
        assert page.evaluate("document.getElementById('top-label').textContent").startswith(
            "not sure (best guess: "
        )
        assert page.evaluate("document.querySelectorAll('#bars .bar').length") == 3
