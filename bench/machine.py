"""What a benchmark records about where it ran, and the quiet environment it runs in."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
from pathlib import Path

from imgcls.processes import QUIET_ENV


def quiet_environment() -> None:
    """No telemetry from MLflow or BentoML, no TensorFlow banner, for this process and its
    children (values already set win). Call it first thing in a benchmark's `main`."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return cpu


def machine() -> dict:
    """CPU, cores, Python, Keras (and its backend), MLflow and BentoML versions, load average."""
    import bentoml
    import keras
    import mlflow

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "system": platform.system(),
        "python": platform.python_version(),
        "keras": f"{keras.__version__} ({keras.backend.backend()})",
        "mlflow": mlflow.__version__,
        "bentoml": bentoml.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }


@contextlib.contextmanager
def bench_home(prefix: str, logs: Path | None):
    """A temporary folder for one benchmark's MLflow store, BentoML home and Keras cache
    (removed afterwards), and the folder its server logs go to (`logs`, else that one)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        os.environ["BENTOML_HOME"] = str(work / "bentoml")
        os.environ.setdefault("KERAS_HOME", str(work / "keras"))
        log_dir = logs or work
        log_dir.mkdir(parents=True, exist_ok=True)
        yield work, log_dir


# The flags that decide what a compiled runtime can use (issue 20): bf16 and AMX.
COMPUTE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_flags() -> str:
    """The CPU's vector and matrix flags from /proc/cpuinfo that a runtime may pick from."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in COMPUTE_FLAGS if f in have) or "none of " + " ".join(COMPUTE_FLAGS)
    return "unknown"
