"""`imgcls demo`: the whole product on embedded defaults, offline, in about a minute.

Writes the digits demo dataset, runs the retrain pipeline (train -> register -> gate ->
promote), starts the BentoML service on the champion and shows one prediction made over
HTTP. Everything lives in the local project folder (`.imgcls/`, see TrackingSettings).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from imgcls.processes import HOST, ServerProcess, free_port, port_in_use
from imgcls.redact import redact_uri

# The demo's embedded run config: the course CNN suits 8x8 digits shown at 32x32. The
# augmentation is the default's pick for it (orientation_bound: a mirrored digit is
# another symbol, so no flips).
DEMO_CONFIG = {"backbone": "simple_cnn", "image_size": 32, "epochs": 15}


def register(subparsers) -> None:
    """Add `imgcls demo`."""
    parser = subparsers.add_parser(
        "demo",
        help="train, register, promote and serve the digits demo, then show a prediction",
        description="End to end on embedded defaults: scikit-learn's digits become a "
        "class-per-folder dataset, the pipeline trains and promotes a champion, and the "
        "BentoML service answers one prediction over HTTP.",
    )
    parser.add_argument(
        "--port", type=int, default=3000, help="service port (default 3000; a free one if taken)"
    )
    parser.add_argument("--epochs", type=int, help="override the demo's 15 epochs")
    parser.add_argument("--keep-serving", action="store_true", help="leave the service running until Ctrl-C")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """The demo's steps; returns 0 when a prediction came back over HTTP.

    SIGTERM is turned into KeyboardInterrupt, like Ctrl-C, so the service's `with` block
    stops the server and every one of its workers whichever of the two arrives.
    """
    with _sigterm_as_interrupt():
        return _demo(args)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _demo(args: argparse.Namespace) -> int:
    from imgcls.settings import TrackingSettings
    from registry.cli import print_decision
    from registry.pipeline import run_pipeline
    from registry.settings import RegistrySettings
    from training.config import load_config
    from training.demo_data import write_digits_dataset

    tracking, registry = TrackingSettings(), RegistrySettings()
    data = write_digits_dataset(tracking.home / "demo-data" / "digits")
    config = load_config(None, data=data, **(DEMO_CONFIG | ({"epochs": args.epochs} if args.epochs else {})))
    print(f"1/3 training on {data} and registering in {redact_uri(tracking.resolved_tracking_uri())}")
    outcome = run_pipeline(config, tracking, registry)
    print_decision(outcome.decision, registry)
    sample = data / "7" / sorted(os.listdir(data / "7"))[0]
    port = free_port() if port_in_use(args.port) else args.port
    log_path = tracking.home.resolve() / "logs" / "demo-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"2/3 starting the BentoML service on http://127.0.0.1:{port} (its log: {log_path})")
    with _service(port, log_path) as server:
        print(f"3/3 POST {sample} to /predict")
        print(json.dumps(_predict(server.url, sample), indent=2))
        if args.keep_serving:
            print(f"serving on {server.url} (web page at /, log: {log_path}) - Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                server.proc.wait()
    print("done: `imgcls serve` serves the champion again, `imgcls ui` opens MLflow")
    return 0


def _service(port: int, log_path: Path) -> ServerProcess:
    """The service on the champion, in its own process group, its output in `log_path`
    (not on this terminal); entering the block waits until /readyz answers."""
    from service.cli import serve_command

    env = os.environ | {"IMGCLS_SERVE_SOURCE": "bentoml", "IMGCLS_SERVE_PORT": str(port)}
    url = f"http://{HOST}:{port}/readyz"
    return ServerProcess(serve_command(HOST, port), url, log_path=log_path, env=env, port=port)


def _predict(url: str, image: Path) -> dict:
    import httpx

    with image.open("rb") as file:
        response = httpx.post(f"{url}/predict", files={"image": (image.name, file, "image/png")}, timeout=30)
    response.raise_for_status()
    return response.json()
