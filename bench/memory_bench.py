"""The service's memory under worst-case uploads (the model process decodes them, the HTTP
fronts check and forward them), and the JPEG draft-decode speedup.

    python -m bench.memory_bench                        # 4 fronts, 64 clients, 40 s
    python -m bench.memory_bench --fronts 1 --clients 8 --seconds 10   # a smoke run
    python -m bench.memory_bench --root /tmp/old-checkout --idle-only  # another checkout's idle fronts

Serves a small untrained CNN (input 224x224, so the resize path is the real one) from a
temporary BentoML store at the default limits (20 MiB upload, 40 MP), with
IMGCLS_SERVE_FRONT_WORKERS fronts; `--clients` Locust users upload the files of
bench/hostile.py in turn (a client told 503 waits 0.2 s, as a client honouring a short
Retry-After would), and bench.sampling.TreeSampler records the fronts' resident memory,
summed, and the model process's. Prints a Markdown table and writes JSON (`--out`).
"""

from __future__ import annotations

import mimetypes
import statistics
import time
from collections import Counter
from pathlib import Path

from bench import harness
from bench.hostile import WORST_CASES
from bench.loadgen import Http, body_files, drive, upload
from bench.sampling import TreeSampler, sample_tree
from bench.servers import bento_model, bento_server

SIZE = 224
NAME = "memory-bench"
TARGET_BYTES = 2 * 1024**3  # the target for four fronts, summed


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__, "memory_bench.json", shared=False, logs=False)
    p.add_argument("--fronts", type=int, default=4, help="HTTP front processes (IMGCLS_SERVE_FRONT_WORKERS)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=40, help="length of the load")
    p.add_argument("--decode-repeats", type=int, default=9, help="timed decodes of the 12 MP JPEG, each way")
    p.add_argument(
        "--root", type=Path, default=harness.ROOT, help="checkout the server runs from (compare versions)"
    )
    p.add_argument("--idle-only", action="store_true", help="only the idle fronts' memory, no load")
    return p.parse_args(argv)


def decode_speed(repeats: int) -> dict:
    """Median ms to turn the 12 MP JPEG into a 224x224 model input: draft vs full decode."""
    from imgcls.images import decode_image, model_input, prepare_image

    data = WORST_CASES["jpeg-12mp"]()
    ways = {
        "draft": lambda _: model_input(data, (SIZE, SIZE)),
        "full": lambda _: prepare_image(decode_image(data), (SIZE, SIZE)),
    }
    out = {f"{name}_ms": harness.timed(way, repeats, warm=1).median_ms for name, way in ways.items()}
    return out | {"speedup": out["full_ms"] / out["draft_ms"], "jpeg_bytes": len(data)}


def uploads_load(url: str, folder: Path, files: list[tuple[str, bytes]]) -> Http:
    """POST /predict with the i-th worst case; a 200 is answered, a 503 waits 0.2 s before
    that user's next request."""
    paths = body_files(folder, [data for _, data in files])
    cycle = (upload("/predict", "image", name, path, mimetypes.guess_type(name)[0], label=name, on_503=0.2)
             for (name, _), path in zip(files, paths, strict=True))  # fmt: skip
    return Http(url, tuple(cycle), timeout_s=120)


def measure(args, work: Path) -> dict:
    files = [(name, make()) for name, make in WORST_CASES.items()]
    with bento_server(work, NAME, work / "server.log", args.root, front_workers=args.fronts) as srv:
        time.sleep(2)
        tree = sample_tree(srv.pid)
        idle = tree.get("front")
        result = {"idle_front_rss_bytes": idle.rss_bytes, "fronts": idle.processes}
        result["idle_model_rss_bytes"] = tree["model"].rss_bytes if "model" in tree else None
        if args.idle_only:
            return result
        load = uploads_load(srv.url, work / "load", files)
        with TreeSampler(srv.pid, interval_s=0.1) as sampler:
            records = drive(load, args.clients, duration_s=args.seconds).records
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
    mem, mb = results["memory"], 1024**2
    rows = [["idle fronts, RSS summed", f"{mem['idle_front_rss_bytes'] / mb:.0f} MB"]]
    if "peak_front_rss_bytes" in mem:
        ok = "met" if mem["peak_front_rss_bytes"] < TARGET_BYTES else "MISSED"
        rows += [["peak fronts RSS summed under load", f"{mem['peak_front_rss_bytes'] / mb:.0f} MB (target 2048 MB: {ok})"],
                 ["mean fronts RSS summed under load", f"{mem['mean_front_rss_bytes'] / mb:.0f} MB"]]  # fmt: skip
        if mem.get("idle_model_rss_bytes"):
            rows.append(["model process RSS, idle / peak under load (it decodes)",
                         f"{mem['idle_model_rss_bytes'] / mb:.0f} / {mem['peak_model_rss_bytes'] / mb:.0f} MB"])  # fmt: skip
        rows += [["requests, by status", f"{mem['requests']}: {mem['statuses']}"],
                 ["answered 200, by file", mem["answered_200_per_case"]]]  # fmt: skip
    if d := results.get("decode"):
        rows += [["12 MP JPEG -> 224x224, full decode", f"{d['full_ms']:.1f} ms"],
                 ["12 MP JPEG -> 224x224, draft decode", f"{d['draft_ms']:.1f} ms ({d['speedup']:.1f}x)"]]  # fmt: skip
    head = f"fronts: {mem['fronts']}, clients: {results['clients']}, {results['load_seconds']} s\n\n"
    return head + harness.table(["figure", "value"], rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def run(work: Path, _stop) -> dict:
        results = {"clients": args.clients, "load_seconds": args.seconds, "root": str(args.root)}
        if not args.idle_only:
            results["decode"] = decode_speed(args.decode_repeats)
        bento_model(work, NAME, SIZE)
        return results | {"memory": measure(args, work)}

    harness.run("memory-bench", args, run, render)


if __name__ == "__main__":
    main()
