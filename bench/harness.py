"""What every benchmark runs in, and the two helpers its figures go through.

    parser = harness.parser(__doc__, "soak_bench.json", front_workers=2)
    args = parser.parse_args(argv)
    harness.run("soak", args, lambda work, stop: {"result": ...}, soak.render)

`run` sets the quiet environment, turns SIGTERM and Ctrl-C into a stop event (and an
unwind: the `with` blocks stop the servers), makes a temporary home (MLflow store,
BentoML home, Keras cache; the server logs unless `--logs`), records the machine at the
start and the load average at the end, writes the JSON and prints the report.
`timed` is the one in-process timing loop, `table` the one Markdown table renderer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgcls.processes import QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# The flags that decide what a compiled runtime can use (issue 20): bf16 and AMX.
COMPUTE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def quiet_environment() -> None:
    """No telemetry from MLflow or BentoML, no TensorFlow banner, for this process and its
    children (values already set win)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _cpuinfo(key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's vector and matrix flags from /proc/cpuinfo that a runtime may pick from."""
    have = _cpuinfo("flags")
    if have is None:
        return "unknown"
    found = [f for f in COMPUTE_FLAGS if f in have.split()]
    return " ".join(found) or "none of " + " ".join(COMPUTE_FLAGS)


def machine() -> dict:
    """CPU (model and compute flags), cores, Python, Keras (and its backend), MLflow and
    BentoML versions, load average."""
    import bentoml
    import keras
    import mlflow

    return {
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "system": platform.system(),
        "python": platform.python_version(), "keras": f"{keras.__version__} ({keras.backend.backend()})",
        "mlflow": mlflow.__version__, "bentoml": bentoml.__version__, "load_average_at_start": os.getloadavg()[0],
    }  # fmt: skip


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


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the returned event (a Locust child stops at once instead of
    finishing its level) and unwind: the `with` blocks stop the servers."""
    stopping = threading.Event()

    def handler(signum, _frame) -> None:
        stopping.set()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stopping


def parser(doc: str, out: str, *, shared: bool = True, logs: bool = True, front_workers: int | None = None):
    """An ArgumentParser with `doc` as its help and the shared options: `--out` (the JSON,
    .imgcls/bench/`out` by default), `--shared`, `--logs`, `--front-workers`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / ".imgcls/bench" / out, help="JSON results file")
    if shared:
        p.add_argument(
            "--shared", type=Path, default=SHARED, help="folder with data/ and weights/ (../shared)"
        )
    if logs:
        p.add_argument("--logs", type=Path, help="keep the server logs in this folder (default: dropped)")
    if front_workers:
        p.add_argument("--front-workers", type=int, default=front_workers,
                       help=f"service's HTTP front processes ({front_workers})")  # fmt: skip
    return p


def names(p: argparse.ArgumentParser, text: str, known: Iterable[str], flag: str) -> list[str]:
    """The comma-separated names of `text`, each one of `known` (else a usage error)."""
    chosen, known = [m.strip() for m in text.split(",") if m.strip()], list(known)
    if not chosen or set(chosen) - set(known):
        p.error(f"{flag}: choose from {sorted(known)}")
    return chosen


def run(name: str, args, measure: Callable[[Path, threading.Event], dict], render: Callable[[dict], str],
        judge: Callable[[dict], dict] = lambda results: results) -> dict:  # fmt: skip
    """`measure(work, stop)` in a temporary home, between the machine record (its "machine"
    key adds to it) and the load average at the end; `judge` adds the verdicts; the results
    written to `args.out` as JSON and printed by `render`."""
    quiet_environment()
    stop = stop_on_signals()
    started = time.perf_counter()
    with bench_home(f"imgcls-{name}-", getattr(args, "logs", None)) as (work, args.log_dir):
        results = {"machine": machine()}
        measured = measure(work, stop)
        results["machine"] |= measured.pop("machine", {})
        results |= measured | {
            "seconds": time.perf_counter() - started,
            "load_average_at_end": os.getloadavg()[0],
        }
    results = judge(results)
    write(results, args.out, render)
    return results


def write(results: dict, out: Path, render: Callable[[dict], str]) -> None:
    """The JSON file, then the machine, the printed report and where the JSON went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(["", *machine_lines(results), render(results), f"\nJSON: {out}"]))


def machine_lines(results: dict) -> list[str]:
    """The machine a report's figures come from, and the load average at its start and end."""
    m = results["machine"]
    return [f"Machine: {m['cpu']}, {m['cores']} cores, CPU flags {m['cpu_flags']}; keras {m['keras']}, mlflow "
            f"{m['mlflow']}, bentoml {m['bentoml']}",
            f"Load average: {m['load_average_at_start']:.1f} at start, {results['load_average_at_end']:.1f} at end"]  # fmt: skip


@dataclass(frozen=True)
class Timing:
    """The ms of each timed call, and the wall and CPU seconds of them all."""

    ms: list[float]
    wall_s: float
    cpu_s: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)


def timed(call: Callable[[int], object], repeats: int = 0, seconds: float = 0.0, warm: int = 2) -> Timing:
    """`call(i)` for i = 0, 1, ... after `warm` untimed `call(0)` (a new shape traces, or
    compiles): `repeats` calls, or as many as fit in `seconds` (at least 3)."""
    for _ in range(warm):
        call(0)
    times, start, cpu = [], time.perf_counter(), time.process_time()
    while len(times) < repeats or (seconds and (time.perf_counter() - start < seconds or len(times) < 3)):
        t0 = time.perf_counter()
        call(len(times))
        times.append((time.perf_counter() - t0) * 1000)
    return Timing(times, time.perf_counter() - start, time.process_time() - cpu)


def percentiles(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and p99 of latencies in ms (None each when there are none)."""
    import numpy as np

    if not len(latencies_ms):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A Markdown table of `rows` (each cell as `str` gives it) under `header`."""
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


def ms(value: float | None, digits: int = 1) -> str:
    """A figure for a table cell: '-' when there is none."""
    return "-" if value is None else f"{value:.{digits}f}"
