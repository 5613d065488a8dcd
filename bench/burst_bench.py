"""Latency at low load after bursts: concurrency 1, 32, 1, 32, 1 against one server.

    python -m bench.burst_bench [--models resnet50,demo] [--rounds 2] [--out FILE]

BentoML 1.4's adaptive batching learned a wait from past queueing, so a lone request
after a burst waited 3-6x longer (issue 10); the service's own batcher (service/batching.py)
keeps no memory. Per case (an untrained model registered as in bench.serve_bench) this
runs the service, then `--rounds` of [c=1, c=32] and a last c=1, on one server, and
reports every level's p50/p99 and images/s beside the model's own batch-1 latency in
process (`predict_on_batch`). Target: every c=1 p50 within 5 ms of that, before and after
the bursts. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

from pathlib import Path

from bench import harness, loadgen
from bench.cases import CASES, register_case
from bench.inprocess import compiled_engines, raw_predict
from bench.photos import photo_jpegs
from bench.serve_bench import FRONT_WORKERS
from bench.servers import service_runtime, service_server

# Requests per level: a c=1 level of 48 gives a steady p50; 8 per client at c=32.
LONE_REQUESTS = {"resnet50": 48, "demo": 200}
BURST_PER_CLIENT = {"resnet50": 8, "demo": 24}
BURST = 32
# The bound on what the service adds to a lone request.
MAX_ADDED_MS = 5.0


def bench_case(key: str, jpegs: list[bytes], args, work: Path, stop) -> dict:
    """The model's own batch-1 latency, then the levels against one running service."""
    import numpy as np

    from imgcls.images import load_image

    case = register_case(key, work)
    inputs = np.stack([load_image(data, (case.size, case.size)) for data in jpegs])
    raw, _ = raw_predict(case, inputs, lambda batch: 48, compiled_engines(case, work / f"{key}-build"))
    levels = [c for _ in range(args.rounds) for c in (1, BURST)] + [1]
    rows = []
    args.cache_dir = work / "serve-cache"  # the service's compiled builds, dropped after
    with (
        service_server(case, True, args, args.log_dir / f"{key}-burst.log") as srv,
        loadgen.probe_client() as client,
    ):
        # The reference: the model's own batch-1 p50 with what the service computes with.
        runtime = service_runtime(client, srv.url)
        method = f"openvino-{runtime['precision']}" if runtime["name"] == "openvino" else "predict_on_batch"
        own = next(r for r in raw if r["method"] == method and r["batch"] == 1)["p50_ms"]
        send = loadgen.predict_load(srv.url, work / "load", jpegs)
        loadgen.run_level(send, 4 * BURST, BURST, 120, stop)  # warm every batch size
        for c in levels:
            n = LONE_REQUESTS[key] if c == 1 else BURST_PER_CLIENT[key] * c
            rows.append(loadgen.run_level(send, n, c, 120, stop))
            print(
                f"  {key} c={c}: p50 {rows[-1]['p50_ms']:.1f} ms, {rows[-1]['images_per_s']:.1f} img/s",
                flush=True,
            )
    return {"model": case.name, "runtime": runtime, "own_batch1_p50_ms": own, "levels": rows}


def render(results: dict) -> str:
    """Markdown: one row per level of each case, and PASS/FAIL for the c=1 target."""
    rows, verdicts = [], []
    for key, result in results["results"].items():
        own = result["own_batch1_p50_ms"]
        for n, row in enumerate(result["levels"], 1):
            added = f"{row['p50_ms'] - own:+.1f} ms" if row["concurrency"] == 1 else ""
            rows.append([key, n, row["concurrency"], f"{row['images_per_s']:.1f}", f"{row['p50_ms']:.1f}",
                         f"{row['p99_ms']:.1f}", row["errors"], added])  # fmt: skip
        lone = [r["p50_ms"] - own for r in result["levels"] if r["concurrency"] == 1]
        ok = all(x <= MAX_ADDED_MS for x in lone)
        runtime = result.get("runtime", {"name": "keras", "precision": "f32"})
        verdicts.append(f"{'PASS' if ok else 'FAIL'} {key}: every c=1 p50 within {MAX_ADDED_MS:g} ms of the "
                        f"model's own batch-1 p50 {own:.1f} ms ({runtime['name']} {runtime['precision']}): "
                        f"{', '.join(f'{x:+.1f}' for x in lone)} ms")  # fmt: skip
    header = [
        "model",
        "#",
        "concurrency",
        "images/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "c=1 p50 - own batch-1 p50",
    ]
    return "\n".join([harness.table(header, rows), "", *verdicts])


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__, "burst_bench.json", front_workers=FRONT_WORKERS)
    p.add_argument("--models", default="resnet50,demo", help="comma-separated cases: resnet50, demo")
    p.add_argument("--rounds", type=int, default=2, help="[c=1, c=32] rounds before the last c=1 (2)")
    args = p.parse_args(argv)
    args.cases = harness.names(p, args.models, CASES, "--models")
    args.max_batch_size = args.max_latency_ms = None  # the service's defaults
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def measure(work: Path, stop) -> dict:
        jpegs, _source = photo_jpegs(args.shared, 32)
        return {"results": {k: bench_case(k, jpegs, args, work, stop) for k in args.cases}}

    harness.run("burst-bench", args, measure, render)


if __name__ == "__main__":
    main()
