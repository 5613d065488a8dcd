"""The Markdown descriptions the MLflow UI shows: on the registered model (what it classifies,
the champion, the last alias moves) and on each version (its card), always under MLflow's
5,000-character description columns; and versions without a wall of per-class tags.

Texts are tested as pure functions; the rest on real MLflow (SQLite in tmp_path), with
bare versions for the limits and one real pipeline, rollback and `models show`.
"""

from __future__ import annotations

import json

import pytest

from tests.registry_fixtures import registry_settings, tracking_settings, write_dataset

# MLflow's registered_models.description and model_versions.description are String(5000).
MLFLOW_LIMIT = 5000
CLASSES = [f"class-{i:03d}-{'long-name-' * 4}" for i in range(200)]


def _metrics(level: float, dip: float = 0.0) -> dict[str, float]:
    recalls = {f"recall_{c}": level - (dip if i == 150 else 0) for i, c in enumerate(CLASSES)}
    return {"accuracy": level, "macro_f1": level} | recalls


def _move(seq, old, new, reason="gate passed"):
    from registry.history import AliasMove

    return AliasMove(
        action="promote",
        from_version=old,
        to_version=new,
        metric="macro_f1",
        candidate_metrics=_metrics(0.8, 0.1),
        champion_metrics=_metrics(0.7),
        reason=reason,
        seq=seq,
    )


def _facts(version="50", status="promoted"):
    from registry.describe import VersionFacts

    return VersionFacts(version, status, "resnet50", "224x224", CLASSES, _metrics(0.8, 0.3), "r" * 32, "7")


def test_model_description_keeps_the_newest_moves_and_fits_with_200_classes_and_50_moves():
    from registry.describe import MAX_CHARS, model_description

    moves = [_move(i, str(i - 1) if i > 1 else None, str(i), "why | " * 200) for i in range(1, 51)]
    text = model_description("image-classifier", "champion", _facts(), moves)
    assert len(text) <= MAX_CHARS < MLFLOW_LIMIT
    assert "**Champion: version 50** since" in text and "macro-F1 0.8000" in text
    assert "200 classes" in text and " more." in text and CLASSES[199] not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows[0].startswith("| 50 |") and "| 49 → 50 |" in rows[0]  # newest first
    assert "macro_f1 0.8000 vs 0.7000" in rows[0] and f"{CLASSES[150][:20]}" in rows[0]
    assert len(rows) < 50 and f"{50 - len(rows)} older moves" in text  # older rows dropped
    assert "why \\| why" in rows[0]  # a pipe in a reason cannot break the table


def test_version_card_has_metrics_weakest_classes_reason_and_run_link():
    from registry.describe import MAX_CHARS, version_description

    moves = [_move(i, str(i - 1), str(i)) for i in range(2, 51)] + [_move(51, "50", "51")]
    text = version_description("image-classifier", "champion", _facts(), "50", moves)
    assert len(text) <= MAX_CHARS
    assert (
        text.splitlines()[0]
        == "resnet50 224x224, 200 classes: test accuracy 0.8000, macro-F1 0.8000 (promoted, champion now)"
    )
    assert "| test macro-F1 | 0.8000 |" in text and "| input size | 224x224 px" in text
    weakest = next(line for line in text.splitlines() if line.startswith("| weakest classes"))
    assert weakest.split("| ")[2].startswith(CLASSES[150][:20])  # recall 0.5, lowest
    assert f"[rrrrrrrr](#/experiments/7/runs/{'r' * 32})" in text
    assert "**Promotion:** made champion by the gate" in text
    rejected = version_description(
        "m", "champion", _facts("52", "rejected"), "50", [], why="macro_f1 gain below the margin"
    )
    assert "**Promotion:** not promoted: macro_f1 gain below the margin" in rejected


def _bare_model(tmp_path, versions: int):
    """A registered model whose versions carry imgcls's tags but no files or runs."""
    from registry.register import connect

    tracking = tracking_settings(tmp_path)
    client = connect(tracking)
    settings = registry_settings(bento_import=False)
    client.create_registered_model(settings.model_name)
    tags = {"class_names": json.dumps(CLASSES), "backbone": "resnet50", "image_size": "224x224"}
    for _ in range(versions):
        client.create_model_version(settings.model_name, source=str(tmp_path / "not-read"), tags=tags)
    return client, tracking, settings


def test_descriptions_in_the_store_stay_under_5000_chars_with_200_classes_and_50_moves(tmp_path):
    from registry.promote import move_alias, rollback

    client, tracking, settings = _bare_model(tmp_path, 10)
    champion = None
    for i in range(50):
        version = str(i % 10 + 1)
        if version == champion:
            version = str((i + 1) % 10 + 1)
        move_alias(client, settings, _move(None, champion, version, "a long reason " * 100))
        champion = version
    rollback(client, tracking, settings, "bad release " * 300)
    model = client.get_registered_model(settings.model_name)
    assert len(model.description) < MLFLOW_LIMIT
    assert (
        f"Champion: version {client.get_model_version_by_alias(settings.model_name, 'champion').version}"
        in (model.description)
    )
    assert "| 51 |" in model.description and "rollback" in model.description
    for v in client.search_model_versions(f"name = '{settings.model_name}'"):
        assert v.description and len(v.description) < MLFLOW_LIMIT, v.version


def test_a_failing_description_write_never_undoes_the_move(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from registry.promote import move_alias
    from registry.versions import champion_version

    client, _, settings = _bare_model(tmp_path, 2)

    def refuse(*_args, **_kwargs):
        raise MlflowException("value too long for type character varying(5000)")

    monkeypatch.setattr(MlflowClient, "update_registered_model", refuse)
    monkeypatch.setattr(MlflowClient, "update_model_version", refuse)
    move_alias(client, settings, _move(None, None, "1"))
    monkeypatch.undo()
    assert champion_version(client, settings) == "1"
    assert client.get_model_version(settings.model_name, "1").tags["imgcls.status"] == "promoted"


@pytest.mark.slow
def test_pipeline_and_rollback_write_readable_descriptions_not_per_class_tags(tmp_path, monkeypatch, capsys):
    """v1 and v2 promoted by pipelines, v3 rejected, then a rollback: the model's
    description has the champion and a row per move, each version its card; versions carry
    no per-class tags, and `models show` and rollback read the figures from the runs."""
    from mlflow import MlflowClient

    from imgcls.cli import main
    from registry.history import move_details, read_history

    tracking = tracking_settings(tmp_path)
    settings = registry_settings(bento_import=False)
    data = write_dataset(tmp_path / "shapes")
    for var, value in {
        "MLFLOW_TRACKING_URI": tracking.resolved_tracking_uri(),
        "IMGCLS_HOME": str(tracking.home),
        "IMGCLS_REGISTRY_MODEL_NAME": settings.model_name,
        "IMGCLS_REGISTRY_BENTO_IMPORT": "false",
        "IMGCLS_REGISTRY_FIRST_MODEL_FLOOR": "0",
        "IMGCLS_REGISTRY_MARGIN": "-1",  # v1 and v2 pass whatever they score
        "IMGCLS_REGISTRY_MAX_RECALL_DROP": "1",
        "COLUMNS": "250",
    }.items():
        monkeypatch.setenv(var, value)
    quick = ["pipeline", "--data", str(data), "--backbone", "simple_cnn", "--image-size", "32"]
    quick += ["--batch-size", "8", "--no-augment", "--epochs", "2"]
    assert main(quick) == 0 and main(quick) == 0
    monkeypatch.setenv("IMGCLS_REGISTRY_MARGIN", "1")  # no gain can pass: v3 is rejected
    assert main(quick) == 3
    assert main(["models", "rollback", "--reason", "v2 misbehaves in the field"]) == 0
    client = MlflowClient(tracking_uri=tracking.resolved_tracking_uri())

    model = client.get_registered_model(settings.model_name).description
    assert "**Champion: version 1** since" in model and "(rollback by " in model
    assert "Classifies images into **3 classes**: circle, square, stripes" in model
    for row in ("| 3 | ", "| 2 | ", "| 1 | "):
        assert any(line.startswith(row) for line in model.splitlines()), (row, model)
    assert "| 2 → 1 |" in model and "v2 misbehaves in the field" in model

    def card(version: str) -> str:
        return client.get_model_version(settings.model_name, version).description

    assert card("1").splitlines()[0].endswith("(promoted, champion now)")
    assert "**Promotion:** made champion by a rollback" in card("1")
    assert "**Promotion:** not promoted: macro_f1" in card("3") and "below the margin 1.0" in card("3")
    assert "| backbone | simple_cnn |" in card("3") and "| weakest classes (recall) | " in card("3")
    run = client.get_run(client.get_model_version(settings.model_name, "3").run_id)
    assert f"(#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})" in card("3")

    tags = client.get_model_version(settings.model_name, "2").tags
    assert not [k for k in tags if k.startswith(("metric.recall_", "metric.precision_", "metric.f1_"))]
    assert {"metric.accuracy", "metric.macro_f1", "class_count", "backbone"} <= set(tags)
    assert tags["class_count"] == "3"
    back = move_details(client, settings, read_history(client, settings)[-1])
    assert back.action == "rollback" and "recall_circle" in back.candidate_metrics
    assert "recall_circle" in back.champion_metrics
    capsys.readouterr()
    assert main(["models", "show", "2"]) == 0
    assert "test_recall_stripes" in capsys.readouterr().out


def test_versions_registered_with_per_class_tags_still_give_rollback_its_figures(tmp_path):
    """Before the run metrics were the source, each version carried `metric.recall_<class>`."""
    from registry.history import move_details, read_history
    from registry.promote import move_alias, rollback
    from registry.register import connect

    client = connect(tracking_settings(tmp_path))
    settings = registry_settings(bento_import=False)
    client.create_registered_model(settings.model_name)
    for level in ("0.7", "0.8"):
        old_tags = {"metric.macro_f1": level, "metric.recall_cat": level, "metric.precision_cat": level}
        client.create_model_version(settings.model_name, source=str(tmp_path / "not-read"), tags=old_tags)
    move_alias(client, settings, _move(None, None, "1"))
    move_alias(client, settings, _move(None, "1", "2"))
    rollback(client, tracking_settings(tmp_path), settings, "old store")
    back = move_details(client, settings, read_history(client, settings)[-1])
    assert back.candidate_metrics == {"macro_f1": 0.7, "recall_cat": 0.7}
    assert back.champion_metrics == {"macro_f1": 0.8, "recall_cat": 0.8}


def test_a_versions_card_says_what_reads_the_backbone():
    from imgcls.modelcard import ModelCard
    from registry.describe import VersionFacts, version_description
    from registry.register import version_tags

    head = "5 heads averaged on the last two blocks"
    card = ModelCard(class_names=["cat", "dog"], image_size=(96, 96), backbone="vgg16", head=head)
    assert version_tags("r1", card, {}, None)["head"] == head
    assert version_tags("r1", card.model_copy(update={"head": None}), {}, None)["head"] == "-"  # older cards
    text = version_description("clf", "champion", VersionFacts("3", head=head), None, [])
    assert f"| head | {head} |" in text
    assert "| head | - |" in version_description("clf", "champion", VersionFacts("4"), None, [])
