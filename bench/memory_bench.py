"""The service's memory under worst-case uploads (the model process decodes them, the HTTP
fronts check and forward them), and the JPEG draft-decode speedup.

    python -m bench.memory_bench                        # 4 fronts, 64 clients, 40 s
    python -m bench.memory_bench --fronts 1 --clients 8 --seconds 10   # a smoke run
    python -m bench.memory_bench --root /tmp/old-checkout --idle-only  # another checkout's idle fronts

Serves a small untrained CNN (input 224x224, so the resize path is the real one) from a
temporary BentoML store at the default limits (20 MiB upload, 40 MP), with
IMGCLS_SERVE_FRONT_WORKERS fronts; `--clients` threads upload the files of
bench/hostile.py in turn (a client told 503 waits 0.2 s, as a client honouring a short
Retry-After would), and bench.sampling.TreeSampler records the fronts' resident memory,
summed, and the model process's. Prints a Markdown table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.hostile import WORST_CASES
from bench.loadgen import Answer, drive, http_client
from bench.machine import machine, quiet_environment
from bench.sampling import TreeSampler, sample_tree

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224
TARGET_BYTES = 2 * 1024**3  # the target for four fronts, summed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--fronts", type=int, default=4, help="HTTP front processes (IMGCLS_SERVE_FRONT_WORKERS)"
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=40, help="length of the load")
    parser.add_argument(
        "--decode-repeats", type=int, default=9, help="timed decodes of the 12 MP JPEG, each way"
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="checkout the server runs from (compare versions)"
    )
    parser.add_argument("--idle-only", action="store_true", help="only the idle fronts' memory, no load")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def decode_speed(repeats: int) -> dict:
    """Median ms to turn the 12 MP JPEG into a 224x224 model input: draft vs full decode."""
    from imgcls.images import decode_image, model_input, prepare_image

    data = WORST_CASES["jpeg-12mp"]()
    ways = {
        "draft": lambda: model_input(data, (SIZE, SIZE)),
        "full": lambda: prepare_image(decode_image(data), (SIZE, SIZE)),
    }
    out = {}
    for name, run in ways.items():
        run()  # warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - start))
        out[f"{name}_ms"] = statistics.median(times)
    out["speedup"] = out["full_ms"] / out["draft_ms"]
    out["jpeg_bytes"] = len(data)
    return out


def save_model(work: Path) -> None:
    """An untrained simple_cnn at 224x224 in a BentoML store under `work` (no MLflow)."""
    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    from imgcls.modelcard import ModelCard
    from service.store import save_to_bento_store
    from training.config import load_config
    from training.model import build_model

    config = load_config(
        None, data=work, backbone="simple_cnn", weights="none", image_size=SIZE, **{"augment.enabled": False}
    )
    path = work / "model.keras"
    build_model(config, 3).save(path)
    card = ModelCard(
        class_names=["a", "b", "c"],
        image_size=(SIZE, SIZE),
        backbone="simple_cnn",
        dataset_fingerprint="memory-bench",
    )
    save_to_bento_store(path, card, name="memory-bench", version=1)


def server(work: Path, args: argparse.Namespace):
    from imgcls.processes import HOST, QUIET_ENV, ServerProcess, free_port
    from service.cli import serve_command

    port = free_port()
    env = {**os.environ, **QUIET_ENV, "BENTOML_HOME": str(work / "bentoml")}
    env.update(
        IMGCLS_SERVE_SOURCE="bentoml",
        IMGCLS_SERVE_MODEL_NAME="memory-bench",
        IMGCLS_SERVE_FRONT_WORKERS=str(args.fronts),
        IMGCLS_SERVE_POLL_INTERVAL_S="0",
    )
    ready = f"http://{HOST}:{port}/readyz"
    return ServerProcess(serve_command(HOST, port), ready, work / "server.log", env=env, cwd=args.root,
                         port=port, timeout_s=240)  # fmt: skip


def uploads_sender(client, url: str, files: list[tuple[str, bytes]]):
    """POST /predict with the i-th worst case; 503s wait 0.2 s before the next request."""

    def send(i: int) -> Answer:
        name, data = files[i % len(files)]
        response = client.post(f"{url}/predict", files={"image": (name, data)})
        if response.status_code == 503:
            time.sleep(0.2)
        if response.status_code != 200:
            return Answer(response.status_code, error=f"{name}: HTTP {response.status_code}")
        return Answer(200)

    return send


def measure(args: argparse.Namespace, work: Path) -> dict:
    files = [(name, make()) for name, make in WORST_CASES.items()]
    with server(work, args) as srv:
        time.sleep(2)
        tree = sample_tree(srv.pid)
        idle = tree.get("front")
        result = {"idle_front_rss_bytes": idle.rss_bytes, "fronts": idle.processes}
        result["idle_model_rss_bytes"] = tree["model"].rss_bytes if "model" in tree else None
        if args.idle_only:
            return result
        with TreeSampler(srv.pid, interval_s=0.1) as sampler, http_client(args.clients, 120) as client:
            records = drive(uploads_sender(client, srv.url, files), args.clients, duration_s=args.seconds)
    statuses = Counter(str(r.status) for r in records)
    per_front = [
        u["front"].rss_bytes / max(1, u["front"].processes) for _, u in sampler.samples if "front" in u
    ]
    return result | {
        "peak_front_rss_bytes": sampler.peak_rss_by_role.get("front", 0),
        "mean_front_rss_bytes": statistics.fmean(
            u["front"].rss_bytes for _, u in sampler.samples if "front" in u
        ),
        "peak_mean_rss_per_front_bytes": max(per_front, default=0),
        "peak_model_rss_bytes": sampler.peak_rss_by_role.get("model", 0),
        "requests": len(records),
        "statuses": dict(statuses),
        "answered_200_per_case": _per_case(records, files),
    }


def _per_case(records, files) -> dict[str, int]:
    counts = Counter(files[r.index % len(files)][0] for r in records if r.status == 200)
    return {name: counts[name] for name, _ in files}


def render(results: dict) -> str:
    mb = 1024**2
    lines = [f"fronts: {results['memory']['fronts']}, clients: {results['clients']}, {results['seconds']} s"]
    lines += ["", "| figure | value |", "|---|---|"]
    mem = results["memory"]
    lines.append(f"| idle fronts, RSS summed | {mem['idle_front_rss_bytes'] / mb:.0f} MB |")
    if "peak_front_rss_bytes" in mem:
        ok = "met" if mem["peak_front_rss_bytes"] < TARGET_BYTES else "MISSED"
        lines.append(
            f"| peak fronts RSS summed under load | {mem['peak_front_rss_bytes'] / mb:.0f} MB (target 2048 MB: {ok}) |"
        )
        lines.append(f"| mean fronts RSS summed under load | {mem['mean_front_rss_bytes'] / mb:.0f} MB |")
        if mem.get("idle_model_rss_bytes"):
            lines.append(
                f"| model process RSS, idle / peak under load (it decodes) | "
                f"{mem['idle_model_rss_bytes'] / mb:.0f} / {mem['peak_model_rss_bytes'] / mb:.0f} MB |"
            )
        lines.append(f"| requests, by status | {mem['requests']}: {mem['statuses']} |")
        lines.append(f"| answered 200, by file | {mem['answered_200_per_case']} |")
    if "decode" in results:
        d = results["decode"]
        lines.append(f"| 12 MP JPEG -> 224x224, full decode | {d['full_ms']:.1f} ms |")
        lines.append(
            f"| 12 MP JPEG -> 224x224, draft decode | {d['draft_ms']:.1f} ms ({d['speedup']:.1f}x) |"
        )
    return "\n".join(lines)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_environment()
    results = {"machine": machine(), "clients": args.clients, "seconds": args.seconds, "root": str(args.root)}
    if not args.idle_only:
        results["decode"] = decode_speed(args.decode_repeats)
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        work = Path(tmp)
        save_model(work)
        results["memory"] = measure(args, work)
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
