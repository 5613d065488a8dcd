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
