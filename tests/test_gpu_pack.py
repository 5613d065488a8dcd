"""The GPU run's wheelhouse (issue 11): it resolves offline against the GPU machine's own
jax and numpy, a pin that would break there is caught here, and it fits the carry limit.

The slow test downloads the real 3.12 wheelhouse (about 30 MiB with locust, from pip's cache after
the first run) into a temporary folder: the packaging check cannot rot unnoticed.
"""

from __future__ import annotations

import shutil
import zipfile

import pytest

from bench import gpu_pack
from bench.gpu_bench import split
from bench.gpu_report import render


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    dest = tmp_path_factory.mktemp("gpu-wheels")
    assert gpu_pack.main(["--dest", str(dest)]) == 0
    return dest


@pytest.mark.slow
def test_wheelhouse_for_the_gpu_machine_resolves_offline_and_fits(wheelhouse, capsys):
    names = {p.name.split("-")[0].lower() for p in wheelhouse.glob("*.whl")}
    assert {"keras", "bentoml", "fastapi", "pydantic_core", "h5py"} <= names
    # What the GPU machine has is never shipped: its CUDA jax and its numpy are used.
    assert not names & {"numpy", "jax", "jaxlib", "pillow", "ml_dtypes", "scipy", "tensorflow", "mlflow"}
    assert all(
        "cp312" in p.name or "none-any" in p.name or "abi3" in p.name for p in wheelhouse.glob("*.whl")
    )
    assert gpu_pack.main(["--dest", str(wheelhouse), "--check"]) == 0
    out = capsys.readouterr().out
    assert "numpy 2.5.2" in out and "jax 0.11.2" in out and "of 64 MiB" in out


@pytest.mark.slow
def test_a_wheel_that_pins_numpy_below_the_machines_fails_the_check(wheelhouse, tmp_path, capsys):
    broken = tmp_path / "wheels"
    shutil.copytree(wheelhouse, broken)
    for old in broken.glob("h5py-*.whl"):
        old.unlink()
    gpu_pack.make_stub("h5py", "3.14.0", broken, requires=("numpy<2.5",), label="")
    assert gpu_pack.main(["--dest", str(broken), "--check"]) == 1
    assert "numpy" in capsys.readouterr().err


@pytest.mark.slow
def test_a_wheelhouse_over_the_carry_limit_fails(wheelhouse, capsys):
    assert gpu_pack.main(["--dest", str(wheelhouse), "--check", "--limit-mib", "5"]) == 1
    assert "over the carry limit of 5" in capsys.readouterr().err


def test_installed_requirements_are_checked_against_what_imports(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for wheel in (
        gpu_pack.make_stub("needs-numpy", "1.0", tmp_path, requires=("numpy>=2",), label=""),
        gpu_pack.make_stub("needs-ghost", "1.0", tmp_path, requires=("ghost-package-xyz>=1",), label=""),
        gpu_pack.make_stub("needs-old-numpy", "1.0", tmp_path, requires=("numpy<1.20",), label=""),
    ):
        zipfile.ZipFile(wheel).extractall(site)
    problems = gpu_pack.check_installed(site)
    assert len(problems) == 2
    assert any("ghost-package-xyz" in p and "not installed" in p for p in problems)
    assert any("numpy<1.20" in p for p in problems)


def test_unpack_installs_a_wheel_without_pip(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    gpu_pack.make_stub("tiny", "1.0", wheels, label="")
    assert gpu_pack.unpack(wheels, site) == 1
    assert (site / "tiny-1.0.dist-info/METADATA").is_file()


def test_concurrency_is_split_evenly_over_client_processes():
    assert split(1, 3) == [1]
    assert split(32, 3) == [11, 11, 10]
    assert split(128, 4) == [32, 32, 32, 32]


def test_report_names_the_limiting_stage_and_the_ratio_to_the_model():
    results = {
        "machine": {"gpu": None, "cpu": "x", "cores": 2, "python": "3.12",
                    "versions": dict.fromkeys(["jax", "keras", "bentoml", "numpy"], "1 (here)")},
        "settings": {"size": 224, "front_workers": 2, "client_procs": 1, "max_batch_size": 32, "level_seconds": 5},
        "images": "48 JPEGs",
        "model": [{"precision": "float32", "device": "cpu:0", "rows": [
            {"batch": 1, "images_per_s": 50.0, "p50_ms": 20, "p95_ms": 21, "p99_ms": 22, "transfer_ms": 0.1},
            {"batch": 32, "images_per_s": 100.0, "p50_ms": 320, "p95_ms": 330, "p99_ms": 340, "transfer_ms": 1.0},
        ]}],
        "stages": {"decode_ms": 2.0, "resize_ms": 1.0, "resize_first_ms": 40.0},
        "service": [{"precision": "float32", "concurrency": 32, "images_per_s": 80.0, "p50_ms": 400,
                     "p95_ms": 450, "p99_ms": 500, "errors": 0, "first_error": None,
                     "cpu_ms_per_image": {"client": 1.0, "front": 6.0, "model": 9.0}, "server": {"mean_batch": 20}}],
        "seconds": 60,
    }  # fmt: skip
    text = render(results)
    assert "| service POST /predict | float32 | c=32 | 80.0 |" in text
    assert "0.80x of batch 32" in text
    # The slowest stage: the model forward pass at 100 images/s (the model process allows 111).
    assert "Limiting stage: **model forward pass**, about 100 images/s." in text
    assert "No GPU" in text


def test_a_failed_step_is_reported_and_the_run_goes_on(tmp_path):
    from bench.gpu_bench import Log, attempt

    results: dict = {"model": [], "service": []}
    log = Log(tmp_path / "log")
    assert attempt(results, "model bfloat16", log, lambda: 1 / 0) is None
    assert attempt(results, "model float32", log, lambda: "figures") == "figures"
    assert results["failures"] == ["model bfloat16: ZeroDivisionError: division by zero"]
    assert "FAILED model bfloat16" in (tmp_path / "log").read_text()
