"""`imgcls serve`: run the BentoML prediction service on the champion.

The options become IMGCLS_SERVE_* variables for the server processes, which read them
through `ServiceSettings` when BentoML imports `service.service`.
"""

from __future__ import annotations

import argparse
import os
import sys

from .settings import ENV_PREFIX

SERVICE = "service.service:ImageClassifier"
# After the graceful timeout, what the arbiter gets to stop its workers before the
# command kills the whole tree (the model worker's own uvicorn waits without a bound).
KILL_MARGIN_S = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="serve the champion over HTTP (BentoML)",
        description="Serve the champion: POST /predict, /predict_batch, /explain; GET / "
        "(web page), /metadata, /livez, /readyz, /metrics. Unset options come from "
        f"{ENV_PREFIX}* variables or .env.",
    )
    p.add_argument("--port", type=int, help="HTTP port (default 3000)")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument(
        "--source",
        choices=["bentoml", "mlflow"],
        help="load the champion from the BentoML model store (default) or from the MLflow "
        "registry (models:/<name>@<alias>)",
    )
    p.add_argument("--model-name", help="registered model name (default image-classifier)")
    p.add_argument("--alias", help="MLflow alias to serve with --source mlflow (default champion)")
    p.add_argument("--bento-tag", help="exact BentoML model tag name:version to serve")
    p.add_argument(
        "--poll-interval",
        dest="poll_interval_s",
        type=float,
        help="seconds between checks of the champion; a new one is loaded, warmed up and "
        "swapped in without a restart (10; 0 turns following off)",
    )
    p.add_argument("--version", help="serve this registry version and never follow (pin)")
    p.add_argument("--cache-dir", help="local copies of loaded versions (default .imgcls/serve-cache)")
    add_runtime_options(p)
    p.add_argument("--top-k", type=int, help="default number of labels per prediction (3)")
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="P",
        help='abstain when the top probability is below P: the answer says "abstained": true '
        'and "label": null, still lists the top-k, and /metrics counts it (default: off)',
    )
    p.add_argument(
        "--no-batching",
        dest="batching",
        action="store_const",
        const=False,
        help="turn batching off: one request per model call (for comparisons)",
    )
    p.add_argument("--max-batch-size", type=int, help="largest batch (32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        help="longest an idle model waits for companions of a lone request (0: none)",
    )
    p.add_argument(
        "--max-latency-ms",
        type=int,
        help="deadline: a request queued longer for the model gets a 503 (10000)",
    )
    p.add_argument("--max-upload-bytes", type=int, help="largest request body; above: 413")
    p.add_argument("--max-pixels", type=int, help="largest image, width x height (40e6)")
    p.add_argument("--max-batch-images", type=int, help="most images per /predict_batch (32)")
    p.add_argument("--gpu", action="store_const", const=True, help="declare one GPU for the model")
    p.add_argument("--model-workers", type=int, help="model processes, each following on its own (1)")
    p.add_argument(
        "--graceful-timeout",
        dest="graceful_timeout_s",
        type=int,
        help="seconds in-flight requests get to finish after SIGTERM or Ctrl-C (30)",
    )
    p.add_argument(
        "--front-workers",
        type=int,
        help="HTTP front processes that decode and resize uploads (1; more where the model is fast)",
    )
    p.add_argument(
        "--one-process",
        action="store_const",
        const=True,
        help="hold the model in the HTTP front's process (no model process, no second hop: "
        "faster on a small CPU machine with one replica; see docs/serving.md)",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        help="predict requests running at once per front process; beyond: 503 with Retry-After (64)",
    )
    p.add_argument(
        "--max-concurrent-explains",
        type=int,
        help="/explain requests running at once per front process; beyond: 503 with Retry-After (2)",
    )
    p.add_argument(
        "--api-keys-file",
        help="file of API keys, one a line: every route but /livez, /readyz, /metrics and the "
        f"page then needs one (Authorization: Bearer KEY or X-API-Key; or {ENV_PREFIX}API_KEYS)",
    )
    p.add_argument(
        "--protect-probes",
        action="store_const",
        const=True,
        help="with API keys, put /metrics behind them too (/livez and /readyz stay open)",
    )
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """Run `bentoml serve` in the foreground with the options as environment variables.

    The server stays this command's child rather than replacing it (exec): SIGTERM,
    SIGINT and SIGHUP are forwarded to BentoML's arbiter, which lets its workers finish
    in-flight requests, and whatever of the tree is left `graceful_timeout_s` plus
    KILL_MARGIN_S later, or after the arbiter died, is killed (imgcls/processes.py).
    Exec would leave nobody to enforce that bound: circus waits up to a day for a
    worker to stop (BentoML sets its graceful_timeout to 86400 s) and the model
    worker's uvicorn gets no shutdown timeout from BentoML.
    """
    from pydantic import ValidationError

    from imgcls.processes import run_in_foreground

    from .settings import ServiceSettings

    os.environ.update(settings_env(args))
    try:
        settings = ServiceSettings()  # validated here, with a clear message, not in a worker
    except ValidationError as exc:
        for error in exc.errors():
            if not error["loc"]:  # a rule across settings
                print(f"error: {error['msg'].removeprefix('Value error, ')}")
                continue
            name = f"{ENV_PREFIX}{'_'.join(map(str, error['loc'])).upper()}"
            print(f"error: {name}={error.get('input')!r}: {error['msg']}")
        return 2
    keys = _api_keys(settings)
    if keys is None:
        return 2
    # Pass every resolved value (.env included) on to the server processes; the keys
    # themselves stay where they were given (the environment, .env or the file).
    values = settings.model_dump(exclude={"api_keys"}).items()
    env = {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in values if v is not None}
    following = (
        f"pinned to version {settings.version}"
        if settings.version
        else f"following {settings.alias} every {settings.poll_interval_s:g} s"
        if settings.poll_interval_s and not settings.bento_tag
        else "not following the registry"
    )
    source = settings.source
    if source == "mlflow":
        from imgcls.redact import redact_uri
        from imgcls.settings import TrackingSettings

        source = f"mlflow at {redact_uri(TrackingSettings().resolved_tracking_uri())}"
    access = f"{len(keys)} API keys" if keys else "no API key"
    print(f"serving on http://{settings.host}:{settings.port} (source: {source}, {following}, {access})")
    command = serve_command(settings.host, settings.port, settings.graceful_timeout_s)
    grace_s = settings.graceful_timeout_s + KILL_MARGIN_S
    return run_in_foreground(command, env={**os.environ, **env}, grace_s=grace_s)


def _api_keys(settings) -> tuple[str, ...] | None:
    """The configured API keys, or None (after saying why) when the keys file is unusable."""
    try:
        keys = settings.api_key_list()
    except OSError as exc:
        print(f"error: --api-keys-file: {exc}")
        return None
    if settings.api_keys_file is not None and not keys:
        print(f"error: --api-keys-file {settings.api_keys_file}: no key in it")
        return None
    return keys


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """--runtime and --precision, shared by `imgcls serve` and `imgcls predict`."""
    p.add_argument("--runtime", choices=["auto", "keras", "openvino"],
                   help="what computes predictions: auto (default) serves each version's OpenVINO "
                   "build once it matches Keras on the version's parity set, else Keras; "
                   "keras: no build")  # fmt: skip
    p.add_argument("--precision", choices=["auto", "f32", "bf16"],
                   help="precision of the OpenVINO build: auto (default) tries bf16 where the CPU "
                   "reports it, then f32")  # fmt: skip


def settings_env(args: argparse.Namespace) -> dict[str, str]:
    """IMGCLS_SERVE_* variables for the options given on the command line."""
    names = [
        "port", "host", "source", "model_name", "alias", "bento_tag", "top_k", "batching",
        "max_batch_size", "max_wait_ms", "max_latency_ms", "max_upload_bytes", "max_pixels",
        "max_batch_images", "gpu", "front_workers", "model_workers", "poll_interval_s",
        "version", "cache_dir", "runtime", "precision", "max_concurrent_requests", "max_concurrent_explains",
        "api_keys_file", "protect_probes", "graceful_timeout_s", "min_confidence", "one_process",
    ]  # fmt: skip
    values = {name: getattr(args, name, None) for name in names}
    return {f"{ENV_PREFIX}{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in values.items() if v is not None}  # fmt: skip


def serve_command(host: str, port: int, graceful_timeout_s: int | None = 30) -> list[str]:
    """The `bentoml serve` command line for the service.

    `graceful_timeout_s` becomes uvicorn's `timeout_graceful_shutdown` in the HTTP fronts
    (BentoML passes it to them only): after SIGTERM they finish in-flight requests for at
    most that long.
    """
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    graceful = ["--timeout-graceful-shutdown", str(graceful_timeout_s)] if graceful_timeout_s else []
    return command + graceful
