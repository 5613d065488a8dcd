"""`imgcls predict`: real files in a folder, a real model from the BentoML store or a
SQLite MLflow registry, the CSV a user reads."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image

from imgcls import parity
from imgcls.cli import build_parser
from service.predictor import Predictor
from service.store import save_to_bento_store
from tests.service_fixtures import (
    build_tiny_model,
    colour_image,
    encode,
    exif_rotated_jpeg,
    log_keras_model,
    parity_set,
    save_tiny_model,
    tiny_card,
)


def _predict(*argv: str) -> int:
    args = build_parser().parse_args(["predict", *argv])
    return args.func(args)


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture
def photos(tmp_path):
    """A folder as users have them: good files of each class (one in a sub-folder, one
    EXIF-rotated), a text file, a truncated PNG, an icon, a hidden file."""
    root = tmp_path / "photos"
    (root / "more").mkdir(parents=True)
    (root / "red.png").write_bytes(encode(colour_image("red", size=(300, 200)), "PNG"))
    (root / "green.jpg").write_bytes(encode(colour_image("green"), "JPEG", quality=95))
    (root / "more" / "blue.png").write_bytes(encode(colour_image("blue"), "PNG"))
    (root / "rotated.jpg").write_bytes(exif_rotated_jpeg(colour_image("red", size=(30, 50))))
    (root / "notes.txt").write_text("shopping list")
    (root / "cut.png").write_bytes(encode(colour_image("red"), "PNG")[:120])
    icon = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(icon, "ICO")
    (root / "favicon.ico").write_bytes(icon.getvalue())
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


@pytest.fixture
def bento_champion(tmp_path):
    """The tiny model in the (per-session) BentoML store as registry version 4, champion."""
    labels = {"alias": "champion", "registered_model": "image-classifier"}
    images = parity.save(parity_set(), tmp_path / parity.PARITY_FILE)  # as training stores it
    return save_to_bento_store(save_tiny_model(tmp_path), tiny_card(), "image-classifier", 4, labels,
                               parity_path=images)  # fmt: skip


def test_a_folder_is_classified_into_a_csv_with_bad_files_listed(photos, tmp_path, bento_champion, capsys):
    single = tmp_path / "single.png"
    single.write_bytes(encode(colour_image("blue", size=(64, 64), seed=3), "PNG"))
    out = tmp_path / "predictions.csv"
    code = _predict(
        "--data", str(photos), str(single), "--out", str(out), "--top-k", "2", "--batch-size", "2"
    )
    assert code == 0
    rows = {r["path"].removeprefix(str(photos) + "/"): r for r in _rows(out)}
    assert list(_rows(out)[0]) == [
        "path",
        "label_1",
        "probability_1",
        "label_2",
        "probability_2",
        "version",
        "error",
    ]
    assert ".DS_Store" not in rows and len(rows) == 8
    labels = {name: r["label_1"] for name, r in rows.items() if not r["error"]}
    assert labels == {"red.png": "red", "green.jpg": "green", "more/blue.png": "blue", "rotated.jpg": "red",
                      str(single): "blue"}  # fmt: skip
    assert {r["version"] for r in rows.values()} == {"4"}
    assert "not an image" in rows["notes.txt"]["error"] and rows["notes.txt"]["label_1"] == ""
    assert "truncated or corrupt" in rows["cut.png"]["error"]
    assert "image format ICO is not accepted" in rows["favicon.ico"]["error"]
    # The service's preprocessing and model: the same probability as the Predictor gives.
    expected = Predictor(build_tiny_model(), tiny_card(), "4").predict_bytes([single.read_bytes()], k=2)[0]
    assert float(rows[str(single)]["probability_1"]) == pytest.approx(expected[0]["probability"], abs=1e-5)
    printed = capsys.readouterr().out
    assert "classified 5 image(s) with version 4 (openvino f32)" in printed and "skipped 3 file(s)" in printed


def test_the_compiled_build_and_keras_give_the_same_labels(photos, tmp_path, bento_champion, capsys):
    compiled, keras_run = tmp_path / "compiled.csv", tmp_path / "keras.csv"
    assert _predict("--data", str(photos), "--out", str(compiled)) == 0
    assert "(openvino f32)" in capsys.readouterr().out
    assert _predict("--data", str(photos), "--out", str(keras_run), "--runtime", "keras") == 0
    assert "(keras f32)" in capsys.readouterr().out
    by_path = {r["path"]: r for r in _rows(keras_run)}
    for row in _rows(compiled):
        same = by_path[row["path"]]
        assert (row["label_1"], row["error"]) == (same["label_1"], same["error"])
        if not row["error"]:
            assert float(row["probability_1"]) == pytest.approx(float(same["probability_1"]), abs=1e-4)


@pytest.fixture
def mlflow_registry(tmp_path, monkeypatch):
    """Two registered versions of the tiny model in a SQLite MLflow registry; 2 is champion."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("IMGCLS_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("p", (tmp_path / "artifacts").as_uri()))
    for _ in range(2):
        with mlflow.start_run():
            info = log_keras_model(build_tiny_model(), tiny_card())
        mlflow.register_model(info.model_uri, "clf")
    mlflow.MlflowClient().set_registered_model_alias("clf", "champion", "2")
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_a_version_from_the_mlflow_registry(photos, tmp_path, mlflow_registry):
    out = tmp_path / "v1.csv"
    common = ["--data", str(photos / "red.png"), "--source", "mlflow", "--model-name", "clf"]
    assert _predict(*common, "--version", "1", "--out", str(out)) == 0
    (row,) = _rows(out)
    assert (row["label_1"], row["version"], row["error"]) == ("red", "1", "")
    assert {"label_3", "probability_3"} <= set(row)  # --top-k 3 by default
    assert _predict(*common, "--out", str(out)) == 0
    assert _rows(out)[0]["version"] == "2"  # the champion


def test_bad_input_exits_2_with_the_reason(tmp_path, bento_champion, capsys):
    assert _predict("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.csv")) == 2
    assert "no such file or folder" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert _predict("--data", str(tmp_path / "empty")) == 2
    assert "no files under" in capsys.readouterr().out
    image = tmp_path / "a.png"
    image.write_bytes(encode(colour_image("red"), "PNG"))
    assert _predict("--data", str(image), "--version", "99", "--out", str(tmp_path / "p.csv")) == 2
    assert "no model: version 99" in capsys.readouterr().out


def test_csv_cells_of_a_row_with_fewer_labels_than_k():
    from service.batch_predict import Row, csv_row

    assert csv_row(Row("x.png", [("red", 0.75)]), 2, "3") == ["x.png", "red", "0.750000", "", "", "3", ""]
