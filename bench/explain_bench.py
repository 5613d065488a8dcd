"""/predict latency under a burst of /explain: steady state, then the same /predict load with
50 concurrent /explain clients, for each explain limit given.

    python -m bench.explain_bench                       # explain limits 1, 2 (the default), 64
    python -m bench.explain_bench --explain-limits 2 --seconds 10 --out results.json

The issue's target: /predict's p99 during the burst stays within 2x of steady state. The
explain clients honour Retry-After, as the 503's contract asks; `--ignore-retry-after`
makes them retry at once (the worst case: the shed requests then cost the front CPU).
The model is an untrained simple_cnn (weights do not change the cost) in a temporary
BentoML store; one front, one model process, as `imgcls serve` runs by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import loadgen
from bench.machine import machine, quiet_environment
from bench.photos import photo_jpegs

ROOT = Path(__file__).resolve().parents[1]
NAME = "explain-bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="model input size (224)")
    p.add_argument("--predict-clients", type=int, default=4, help="closed-loop /predict clients (4)")
    p.add_argument(
        "--explain-clients", type=int, default=50, help="concurrent /explain clients in the burst (50)"
    )
    p.add_argument(
        "--explain-limits", default="1,2,64", help="IMGCLS_SERVE_MAX_CONCURRENT_EXPLAINS values to run"
    )
    p.add_argument("--seconds", type=float, default=20, help="length of each phase (20)")
    p.add_argument("--ignore-retry-after", action="store_true", help="explain clients retry a 503 at once")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def save_model(work: Path, size: int) -> None:
    """An untrained simple_cnn at `size` in a BentoML store under `work` (no MLflow)."""
    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    from imgcls.modelcard import ModelCard
    from service.store import save_to_bento_store
    from training.config import load_config
    from training.model import build_model

    config = load_config(
        None, data=work, backbone="simple_cnn", weights="none", image_size=size, **{"augment.enabled": False}
    )
    build_model(config, 3).save(work / "model.keras")
    card = ModelCard(
        class_names=["a", "b", "c"], image_size=(size, size), backbone="simple_cnn", dataset_fingerprint=NAME
    )
    save_to_bento_store(work / "model.keras", card, name=NAME, version=1)


def server(work: Path, explain_limit: int):
    from imgcls.processes import HOST, QUIET_ENV, ServerProcess, free_port
    from service.cli import serve_command

    port = free_port()
    env = {**os.environ, **QUIET_ENV, "BENTOML_HOME": str(work / "bentoml")}
    env.update(
        IMGCLS_SERVE_SOURCE="bentoml",
        IMGCLS_SERVE_MODEL_NAME=NAME,
        IMGCLS_SERVE_POLL_INTERVAL_S="0",
        IMGCLS_SERVE_MAX_CONCURRENT_EXPLAINS=str(explain_limit),
    )
    ready = f"http://{HOST}:{port}/readyz"
    log = work / f"server-{explain_limit}.log"
    return ServerProcess(serve_command(HOST, port), ready, log, env=env, cwd=ROOT, port=port, timeout_s=240)


def explain_sender(client, url: str, jpegs: list[bytes], honour_retry_after: bool, counts: dict):
    """POST /explain; counts 200s and 503s; a 503 waits its Retry-After when honoured."""

    def send(i: int) -> loadgen.Answer:
        answer = client.post(f"{url}/explain", files={"image": (f"{i}.jpg", jpegs[i % len(jpegs)])})
        counts[answer.status_code] = counts.get(answer.status_code, 0) + 1
        if answer.status_code == 503 and honour_retry_after:
            time.sleep(float(answer.headers.get("retry-after", "1")))
        return loadgen.Answer(answer.status_code)

    return send


def measure(url: str, args: argparse.Namespace, jpegs: list[bytes]) -> dict:
    """/predict percentiles in steady state and during the /explain burst."""
    clients = args.predict_clients + args.explain_clients
    with loadgen.http_client(clients, timeout_s=120) as client:
        predict = loadgen.service_sender(client, url, jpegs)
        loadgen.drive(predict, args.predict_clients, requests=32)  # warm-up
        steady = loadgen.drive(predict, args.predict_clients, duration_s=args.seconds)
        counts: dict[int, int] = {}
        explain = explain_sender(client, url, jpegs, not args.ignore_retry_after, counts)
        stop = threading.Event()
        burst = threading.Thread(target=lambda: loadgen.drive(explain, args.explain_clients, stop=stop))
        burst.start()
        time.sleep(1)  # let the burst reach the server
        during = loadgen.drive(predict, args.predict_clients, duration_s=args.seconds)
        stop.set()
        burst.join()
    return {
        "steady": loadgen.summarize(steady, args.seconds),
        "burst": loadgen.summarize(during, args.seconds),
        "explain_statuses": {str(k): v for k, v in sorted(counts.items())},
    }


def render(results: dict) -> str:
    lines = [
        f"/predict ({results['predict_clients']} clients) with {results['explain_clients']} concurrent /explain "
        f"clients, simple_cnn at {results['size']}, {results['seconds']:g} s per phase",
        "",
        "| explain limit | steady p50 / p99 | burst p50 / p99 | p99 burst / steady | /predict errors | /explain answers |",
        "|---|---|---|---|---|---|",
    ]
    for limit, row in results["runs"].items():
        s, b = row["steady"], row["burst"]
        ratio = b["p99_ms"] / s["p99_ms"] if s["p99_ms"] and b["p99_ms"] else float("nan")
        statuses = ", ".join(f"{v} x {k}" for k, v in row["explain_statuses"].items())
        lines.append(
            f"| {limit} | {s['p50_ms']:.0f} / {s['p99_ms']:.0f} ms | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} ms "
            f"| **{ratio:.2f}x** (target <= 2x) | {s['errors'] + b['errors']} | {statuses} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_environment()
    limits = [int(x) for x in args.explain_limits.split(",") if x.strip()]
    results = {
        "machine": machine(),
        **{k: getattr(args, k) for k in ("size", "predict_clients", "explain_clients", "seconds")},
    }
    results["ignore_retry_after"], results["runs"] = args.ignore_retry_after, {}
    jpegs, _ = photo_jpegs(ROOT.parent / "shared", 16)
    with tempfile.TemporaryDirectory(prefix="explain-bench-") as tmp:
        work = Path(tmp)
        save_model(work, args.size)
        for limit in limits:
            with server(work, limit) as srv:
                results["runs"][limit] = measure(srv.url, args, jpegs)
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
