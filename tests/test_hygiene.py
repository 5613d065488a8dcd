"""Hygiene (issue 9): temporary split images under IMGCLS_HOME/tmp with stale ones swept,
and no password of a tracking URI in anything imgcls prints or logs; (issue 21) no import
circle between the project's modules."""

from __future__ import annotations

import ast
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from imgcls.processes import QUIET_ENV
from imgcls.redact import RedactingFilter, redact_logs, redact_text, redact_uri
from imgcls.scratch import OWNER_FILE, scratch_dir, scratch_root, sweep_stale
from tests.conftest import quick_config

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret-Pa55"
PACKAGES = ("imgcls", "training", "registry", "service")


def _project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Project modules that `name` imports -> the first line that does: every import in the
    file (module level, inside functions, under TYPE_CHECKING), `from . import x` resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from package import module` imports the module; `from module import name`, the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target in modules and target != name:
                found[target] = min(found.get(target, node.lineno), node.lineno)
    return found


def _import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The cycles a depth-first search of `graph` closes, each as [a, b, ..., a]; none when
    the graph is acyclic."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once explored
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_import_cycle_finder_sees_lazy_and_type_checking_imports(tmp_path):
    """The checker itself, on a made-up package: a circle closed by an import inside a
    function and under TYPE_CHECKING is found; without that import there is none."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import C\n"
    )
    (pkg / "c.py").write_text("def f():\n    from .a import x\n")
    modules = {"pkg": pkg / "__init__.py", **{f"pkg.{m}": pkg / f"{m}.py" for m in "abc"}}
    graph = {name: _imported_modules(name, path, modules) for name, path in modules.items()}
    assert _import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    del graph["pkg.c"]["pkg.a"]
    assert _import_cycles(graph) == []


def test_no_import_cycle_between_project_modules():
    """Issue 21: the imports between imgcls/, training/, registry/ and service/ modules form
    no circle, counting imports inside functions and under TYPE_CHECKING."""
    modules = _project_modules()
    graph = {name: _imported_modules(name, path, modules) for name, path in modules.items()}
    cycles = [
        " -> ".join(f"{a}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"
        for cycle in _import_cycles(graph)
    ]  # module:line of the import that leads on
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"http://alice:{SECRET}@mlflow:5000", "http://alice:***@mlflow:5000"),
        (f"https://alice:{SECRET}@mlflow.example.com/api", "https://alice:***@mlflow.example.com/api"),
        (f"postgresql://mlflow:{SECRET}@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        (f"postgresql+psycopg://mlflow:{SECRET}@db/mlflow", "postgresql+psycopg://mlflow:***@db/mlflow"),
        (f"https://{SECRET}@mlflow.example.com", "https://***@mlflow.example.com"),
        (f"http://mlflow:5000/?token={SECRET}&x=1", "http://mlflow:5000/?token=***&x=1"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("sqlite:////home/me/.imgcls/mlflow.db", "sqlite:////home/me/.imgcls/mlflow.db"),
        ("databricks", "databricks"),
    ],
)
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown


def test_redact_text_finds_every_uri_in_a_message():
    message = (
        f"could not reach http://alice:{SECRET}@mlflow:5000 (store postgresql://u:{SECRET}@db/m); "
        "see https://mlflow.org/docs"
    )
    clean = redact_text(message)
    assert SECRET not in clean
    assert "http://alice:***@mlflow:5000" in clean and "postgresql://u:***@db/m" in clean
    assert "https://mlflow.org/docs" in clean
    assert redact_uri(None) is None


def test_log_records_are_redacted_messages_args_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("registry.test_redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        redact_logs(logger)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        redact_logs(logger)  # idempotent
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logger.info("tracking at %s", f"http://alice:{SECRET}@mlflow:5000")
        try:
            raise ConnectionError(f"refused: postgresql://mlflow:{SECRET}@db/mlflow")
        except ConnectionError:
            logger.exception("pipeline failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "tracking at http://alice:***@mlflow:5000" in out
    assert "refused: postgresql://mlflow:***@db/mlflow" in out and "Traceback" in out
    assert SECRET not in out


def _imgcls(*args: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imgcls.cli", "-v", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_commands_never_print_the_password_of_the_tracking_uri(tmp_path):
    """`imgcls ui` on a tracking server names it, and `imgcls models list` against one
    that refuses the connection fails with its error, both with the password hidden
    (stdout and the -v debug log)."""
    uri = f"http://alice:{SECRET}@127.0.0.1:9"  # port 9: nothing listens, refused at once
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": uri, "IMGCLS_HOME": str(tmp_path / "home"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # fmt: skip
    ui = _imgcls("ui", env=env)
    assert ui.returncode == 0, ui.stderr[-2000:]
    assert "open http://alice:***@127.0.0.1:9 in a browser" in ui.stdout
    listing = _imgcls("models", "list", env=env)
    assert listing.returncode == 1 and "error:" in listing.stdout, listing.stdout + listing.stderr[-2000:]
    for out in (ui.stdout, ui.stderr, listing.stdout, listing.stderr):
        assert SECRET not in out


def _dead_pid() -> tuple[int, float]:
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def _folder(root: Path, name: str, owner: str | None = None, age_s: float = 0) -> Path:
    path = root / name
    (path / "train" / "red").mkdir(parents=True)
    (path / "train" / "red" / "0000000.png").write_bytes(b"png")
    if owner is not None:
        (path / OWNER_FILE).write_text(owner)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_sweep_removes_dead_owners_and_old_unowned_folders_only(tmp_path):
    import psutil

    home, day = tmp_path / "home", 24 * 3600
    root = scratch_root(home)
    me = f"{os.getpid()} {psutil.Process().create_time()}"
    pid, started = _dead_pid()
    dead = _folder(root, "imgcls-view-dead", f"{pid} {started}")
    reused = _folder(root, "imgcls-view-reused", f"{os.getpid()} {started - 1000}")  # pid reused since
    old = _folder(root, "imgcls-view-old", None, age_s=2 * day)
    fresh = _folder(root, "imgcls-view-fresh", None, age_s=60)
    live_old = _folder(root, "imgcls-view-live", me, age_s=3 * day)
    assert sorted(sweep_stale(home)) == sorted([dead, reused, old])
    assert sorted(p.name for p in root.iterdir()) == sorted([fresh.name, live_old.name])
    assert sweep_stale(tmp_path / "nothing-here") == []


def test_scratch_dir_is_owned_and_removed(tmp_path):
    with scratch_dir(tmp_path, "imgcls-view-") as path:
        assert path.parent == tmp_path / "tmp" and path.name.startswith("imgcls-view-")
        assert int((path / OWNER_FILE).read_text().split()[0]) == os.getpid()
        assert sweep_stale(tmp_path) == []  # its owner runs
    assert not path.exists()


@pytest.mark.slow
def test_training_writes_split_images_under_home_tmp_and_sweeps_a_dead_runs_folder(
    shapes_dir_shared, tracking, tmp_path, monkeypatch
):
    """A run killed earlier left its split images; the next run removes them, writes its
    own under IMGCLS_HOME/tmp (nothing in TMPDIR) and removes them when it ends."""
    from training.train import train

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))  # tempfile caches TMPDIR
    pid, started = _dead_pid()
    left = _folder(scratch_root(tracking.home), "imgcls-view-killed", f"{pid} {started}")
    seen: list[Path] = []
    import training.data as data

    def write_view(scan, split, dest, size):  # the real one, watched: where does it write?
        seen.append(dest)
        return original(scan, split, dest, size)

    original = data.write_view
    monkeypatch.setattr(data, "write_view", write_view)
    result = train(quick_config(shapes_dir_shared, epochs=1), tracking)
    assert result.run_id
    assert not left.exists()
    assert seen and all(scratch_root(tracking.home) in p.parents for p in seen)
    assert list(scratch_root(tracking.home).iterdir()) == []
    assert not [p for p in system_tmp.rglob("*") if "imgcls-view" in p.name]


@pytest.mark.slow
def test_the_service_logs_mlflow_errors_without_the_password(tmp_path):
    """`imgcls serve --source mlflow` against a login URI whose server is down: the model
    workers log MLflow's errors, which quote the request URL, with the password hidden."""
    from imgcls.processes import free_port, start, stop

    port = free_port()
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": f"http://alice:{SECRET}@127.0.0.1:9",
           "IMGCLS_HOME": str(tmp_path / "home"), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "IMGCLS_SERVE_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    log = tmp_path / "serve.log"
    cli = start([sys.executable, "-m", "imgcls.cli", "serve", "--source", "mlflow", "--port", str(port)],
                log, env=env, cwd=ROOT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count("alice:***@127.0.0.1:9") < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        assert stop(cli, port=port) == []
    text = log.read_text()
    assert "alice:***@127.0.0.1:9/api/" in text, text[-3000:]  # a worker's MLflow error
    assert SECRET not in text
