"""`python -m bench.train_bench --only defaults --seeds ... --set ...`: which runs it makes
(the runs themselves are the benchmark's; their figures live in docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

from bench import train_bench, train_data


def test_seeds_and_set_fields_make_one_run_per_row_and_seed(monkeypatch, tmp_path):
    monkeypatch.setattr(train_bench, "extract", lambda archive, into: Path(into))
    monkeypatch.setattr(train_data, "photo_folder", lambda *args: tmp_path / "photos")
    monkeypatch.setattr(train_data, "mnist_subset", lambda *args: tmp_path / "mnist")
    calls = []
    monkeypatch.setattr(
        train_bench, "default_command", lambda data, options, home: calls.append((data.name, options)) or {}
    )
    out = train_bench.defaults(
        tmp_path, tmp_path, ["cifar_search", "photo"], seeds=[42, 0], extra={"ensemble_fit": "train"}
    )
    assert list(out) == ["cifar_search@seed42", "cifar_search@seed0", "photo@seed42", "photo@seed0"]
    assert [(name, o["seed"], o["ensemble_fit"], o.get("search")) for name, o in calls] == [
        ("cifar", 42, "train", 20),
        ("cifar", 0, "train", 20),
        ("photos", 42, "train", None),
        ("photos", 0, "train", None),
    ]


def test_the_table_checks_each_rows_targets_and_the_pass_ratio_of_the_default_command():
    row = {
        "images": {"train": 700, "val": 300, "test": 200},
        "augment": "photo",
        "augment_passes": "1",
        "epochs": 18,
        "test_accuracy": 0.66,
        "seconds": 40.0,
        "backbone_pass_seconds": 16.0,
        "seconds_vs_backbone_pass": 2.5,
        "linear_probe_test_accuracy": 0.67,
    }
    table = train_bench.defaults_table(
        {
            "cifar": row | {"options": {"image_size": "96"}},
            "cifar_search": row | {"options": {"image_size": "96", "search": "20"}},
            "photo@seed0": row | {"options": {}, "seconds_vs_backbone_pass": 1.8},
        }
    ).splitlines()
    assert table[2].endswith("| <= 2x one backbone pass: missed |")
    # With --search the run is not the default command: no pass target, its own accuracy one.
    assert table[3].endswith("| >= 0.655 (0.605 + 5 points): met |")
    assert table[4].endswith("| < 300 s, vs linear probe: met; <= 2x one backbone pass: met |")
