"""The team stack as plain processes: PostgreSQL 15, a moto S3 endpoint and `mlflow server`.

Session-scoped fixtures, started once on free loopback ports and torn down at the end of
the session even when a test fails. The MLflow server is the one docker-compose.yml runs:
the same settings file (registry/mlflow-server.env, read by `registry.server`), the same
basic-auth config (docker/mlflow/basic_auth.ini, with the test's own database), the
PostgreSQL backend and proxied S3 artifacts. Only the server holds S3 credentials.

Use them from a test module with `pytest_plugins = ["tests.stack"]` (every module then
shares one instance; importing the fixtures by name would start one per module), then ask
for `team_stack`. A client process (`imgcls pipeline`, `imgcls serve --source mlflow`)
gets its environment from `team_stack.process_env()` (the admin) or
`team_stack.process_env(reader=True)` (the read-only `classifier` user): the server's URL
and a login, and no S3 credentials.

A tool that is not installed skips the test on a laptop, and fails it under `CI=true`:
a skipped team-stack test would hide a broken install.
"""

from __future__ import annotations

import configparser
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imgcls import processes
from imgcls.processes import QUIET_ENV as CHILD_ENV
from imgcls.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
AUTH_INI = ROOT / "docker" / "mlflow" / "basic_auth.ini"
CREATE_READER = ROOT / "docker" / "mlflow" / "create_reader.py"
# No ~/.aws files either: boto3 then finds no credentials at all.
NO_AWS_FILES = {"AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}
# What could let a client reach S3 itself; a client of the stack has none of them.
S3_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "MLFLOW_S3_ENDPOINT_URL",
)
# Cold starts on 2 busy cores: MLflow's first start creates ~60 tables in two databases.
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server with one login role owning the databases it made."""

    port: int
    user: str
    password: str = field(repr=False)
    databases: tuple[str, ...]

    def url(self, database: str, with_password: bool = True) -> str:
        """A `postgresql://` URL (psycopg 3 under SQLAlchemy 2.1); without the password,
        libpq takes it from `PGPASSWORD`, which keeps it out of URLs and logs."""
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"


@dataclass(frozen=True)
class S3:
    """A moto S3 endpoint with one bucket; the keys are what the MLflow server gets."""

    endpoint: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)

    def client(self):
        """A boto3 S3 client on the endpoint (for tests that look inside the bucket)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


@dataclass(frozen=True)
class TeamStack:
    """`mlflow server --app-name basic-auth` on PostgreSQL with S3 artifacts, and its users."""

    url: str
    admin: tuple[str, str] = field(repr=False)  # (user, password)
    reader: tuple[str, str] = field(repr=False)
    postgres: Postgres
    s3: S3
    log: Path

    def client_env(self, reader: bool = False) -> dict[str, str]:
        """What a client adds to its environment: the server's URL and a user (the admin,
        or the read-only `classifier` with `reader=True`)."""
        user, password = self.reader if reader else self.admin
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
        }

    def process_env(self, reader: bool = False, **extra: str) -> dict[str, str]:
        """The whole environment of a client process (`imgcls pipeline`, `imgcls serve`):
        this one without any S3 credentials, quiet and offline, a user, and `extra`."""
        clean = {k: v for k, v in os.environ.items() if k not in S3_CREDENTIALS}
        return clean | CHILD_ENV | NO_AWS_FILES | self.client_env(reader) | extra


# -- processes: started and stopped by imgcls/processes.py -------------------------------------


def start_process(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` in its own session with output to `log_path`; `env` replaces os.environ."""
    return processes.start(argv, log_path, env=env, cwd=ROOT)


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
    """Send `sig` to the process's session, then SIGKILL if it is still there after `timeout_s`."""
    processes.stop(process, term_timeout_s=timeout_s, first_signal=sig)


def wait_until(ready, process: subprocess.Popen, log_path: Path, what: str) -> None:
    """Poll `ready()` until it is true; fail with the log's tail if the process exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _ready(ready):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready in {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.3)


def _ready(check) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - anything short of success means "not yet"
        return False


def unavailable(reason: str):
    """Skip on a laptop, fail under CI=true: a skipped stack test would hide a broken install."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"team stack unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"team stack unavailable: {reason} (make test installs it)")


# -- PostgreSQL -------------------------------------------------------------------------------


def pg_bin() -> Path:
    """Debian's PostgreSQL 15 server programs (compose runs postgres:15), else the newest."""
    root = Path("/usr/lib/postgresql")
    found = sorted(
        (p for p in root.glob("*/bin") if p.parent.name.isdigit()), key=lambda p: int(p.parent.name)
    )
    preferred = root / "15" / "bin"
    return preferred if preferred in found or not found else found[-1]


def _as_postgres(*argv: str) -> list[str]:
    """A command run as the `postgres` OS user (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


def _check_postgres_installed() -> None:
    if not (pg_bin() / "postgres").exists():
        unavailable(f"the PostgreSQL server is not installed ({pg_bin()}; apt-get install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        unavailable("runuser is missing (util-linux)")


def _psql(port: int, folder: Path, sql: str) -> None:
    """Run `sql` as the superuser over the server's socket; the SQL goes on stdin, so the
    role's password never appears in a command line."""
    argv = _as_postgres(
        str(pg_bin() / "psql"), "-v", "ON_ERROR_STOP=1", "-q", "-h", str(folder), "-p", str(port)
    )
    subprocess.run([*argv, "-U", "postgres", "-d", "postgres"], input=sql, text=True, check=True, timeout=60)


def _initdb(folder: Path) -> Path:
    """A fresh cluster in `folder/data`, owned by `postgres`; local socket logins trusted."""
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    subprocess.run(
        _as_postgres(str(pg_bin() / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    # TCP logins need the password; the socket (in our folder, mode 0700) stays trusted.
    (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    return data


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """PostgreSQL 15 on a free loopback port, with databases `mlflow` and `mlflow_auth`."""
    _check_postgres_installed()
    folder = Path(tempfile.mkdtemp(prefix="imgcls-pg-"))  # outside pytest's root-only folders
    port = free_port()
    try:
        data = _initdb(folder)
        argv = _as_postgres(
            str(pg_bin() / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200",
        )  # fmt: skip
        log = folder / "postgres.log"
        process = start_process(argv, log)
        try:
            wait_until(lambda: _pg_ready(port, folder), process, log, "postgres")
            pg = Postgres(port, "imgcls", secrets.token_urlsafe(16), ("mlflow", "mlflow_auth"))
            _psql(port, folder, _create_role_and_databases(pg))
            yield pg
        finally:
            stop_process(process, signal.SIGINT)  # SIGINT: "fast" shutdown, clients or not
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pg_ready(port: int, folder: Path) -> bool:
    argv = [str(pg_bin() / "pg_isready"), "-q", "-h", str(folder), "-p", str(port)]
    return subprocess.run(argv, timeout=10).returncode == 0


def _create_role_and_databases(pg: Postgres) -> str:
    databases = "".join(f"CREATE DATABASE {db} OWNER {pg.user};\n" for db in pg.databases)
    return f"CREATE ROLE {pg.user} LOGIN PASSWORD '{pg.password}';\n{databases}"


# -- S3 (moto) --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """The standalone moto server on a free loopback port, with the artifact bucket."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        unavailable(f"moto[server] / boto3 are not installed ({exc})")
    folder = Path(tempfile.mkdtemp(prefix="imgcls-s3-"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = folder / "moto.log"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = start_process(argv, log, os.environ | CHILD_ENV)
    try:
        bucket = S3(endpoint, "mlflow", secrets.token_hex(10), secrets.token_urlsafe(20))
        wait_until(lambda: bucket.client().list_buckets() is not None, process, log, "moto")
        bucket.client().create_bucket(Bucket=bucket.bucket)
        yield bucket
    finally:
        stop_process(process)
        shutil.rmtree(folder, ignore_errors=True)


# -- mlflow server ----------------------------------------------------------------------------


def auth_config(pg: Postgres, folder: Path) -> Path:
    """docker/mlflow/basic_auth.ini with the auth database on this PostgreSQL (no password
    in the file: libpq reads PGPASSWORD)."""
    config = configparser.ConfigParser()
    config.read(AUTH_INI)
    config["mlflow"]["database_uri"] = pg.url("mlflow_auth", with_password=False)
    path = folder / "basic_auth.ini"
    with open(path, "w") as handle:
        config.write(handle)
    return path


def mlflow_server_env(pg: Postgres, bucket: S3, port: int, auth_ini: Path, admin_password: str) -> dict:
    """The server's environment: the shared settings plus this stack's store, S3 and secrets."""
    from registry.server import server_env

    return server_env(
        pg.url("mlflow", with_password=False),
        f"s3://{bucket.bucket}/artifacts",
        "127.0.0.1",
        port,
        **CHILD_ENV,
        PGPASSWORD=pg.password,
        MLFLOW_S3_ENDPOINT_URL=bucket.endpoint,
        AWS_ACCESS_KEY_ID=bucket.access_key,
        AWS_SECRET_ACCESS_KEY=bucket.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
    )


def _api_answers(url: str, admin: tuple[str, str]) -> bool:
    """A real API call, past the Host check and the auth layer (`/health` is exempt from both)."""
    import httpx

    response = httpx.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "Default"},
                         auth=admin, timeout=5)  # fmt: skip
    return response.status_code == 200


def create_reader(url: str, admin: tuple[str, str], username: str = "classifier") -> tuple[str, str]:
    """A user that may only read, made by the admin with compose's own `mlflow-init` script."""
    reader = (username, secrets.token_urlsafe(16))
    env = (
        os.environ
        | CHILD_ENV
        | {
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_TRACKING_USERNAME": admin[0],
            "MLFLOW_TRACKING_PASSWORD": admin[1],
            "IMGCLS_READER_USERNAME": reader[0],
            "IMGCLS_READER_PASSWORD": reader[1],
        }
    )
    subprocess.run(
        [sys.executable, str(CREATE_READER)], env=env, check=True, capture_output=True, timeout=120
    )
    return reader


@pytest.fixture(scope="session")
def team_stack(postgres: Postgres, s3: S3) -> Iterator[TeamStack]:
    """`mlflow server --app-name basic-auth` as compose runs it, on `postgres` and `s3`."""
    from registry.server import server_command

    folder = Path(tempfile.mkdtemp(prefix="imgcls-mlflow-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    admin = ("admin", secrets.token_urlsafe(16))
    env = mlflow_server_env(postgres, s3, port, auth_config(postgres, folder), admin[1])
    log = folder / "mlflow.log"
    process = start_process(server_command(app_name="basic-auth"), log, env)
    try:
        wait_until(lambda: _api_answers(url, admin), process, log, "mlflow server")
        yield TeamStack(url, admin, create_reader(url, admin), postgres, s3, log)
    finally:
        stop_process(process)
        shutil.rmtree(folder, ignore_errors=True)
