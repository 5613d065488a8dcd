"""The soak benchmark's traffic mix and its analysis: pure functions over records and
memory samples (tested in tests/test_soak_report.py), and the mix as a Locust load.

Request `i` is of kind `kind_of(i)`: a fixed, interleaved cycle of MIX, so the analysis
knows each record's kind from its index alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from bench import harness
from bench.harness import ms, percentiles
from bench.loadgen import Http, Record, body_files

# Per 40 requests: 28 /predict, 4 /predict_batch (4 images), 2 /explain, and 6 bad
# inputs, one or two of each kind. "too_big" is rare on purpose: each is a 20 MiB upload.
MIX = (
    ("predict", 28),
    ("predict_batch", 4),
    ("explain", 2),
    ("not_image", 2),
    ("truncated", 2),
    ("wrong_field", 1),
    ("too_big", 1),
)
GOOD = ("predict", "predict_batch", "explain")
BAD = tuple(kind for kind, _ in MIX if kind not in GOOD)
BATCH_IMAGES = 4
# Memory before this is warm-up (first batches of each shape, allocator pools filling).
WARM_UP_S = 60.0
# Resident memory may grow this much from the end of warm-up to the end, per process.
GROWTH_LIMIT = 0.10
# A minute's p99 may be this many times the median minute's p99.
P99_SPREAD_LIMIT = 2.0
# Seconds of samples averaged at each end of the memory comparison: one sample is noisy.
RSS_WINDOW_S = 10.0


def _cycle() -> list[str]:
    """MIX spread out: each kind at even steps through a cycle of sum(weights) requests."""
    total = sum(weight for _, weight in MIX)
    slots = sorted((((n + 0.5) / weight, kind) for kind, weight in MIX for n in range(weight)))
    assert len(slots) == total
    return [kind for _, kind in slots]


CYCLE = _cycle()


def kind_of(i: int) -> str:
    """The kind of request number `i`."""
    return CYCLE[i % len(CYCLE)]


def mixed_load(url: str, folder: Path, jpegs: Sequence[bytes], max_upload_bytes: int, timeout_s: float):
    """The MIX for the Locust child (request `i` of kind `kind_of(i)`, on JPEG `i` mod their
    count): good requests must answer 200, bad ones a 4xx; anything else (a 5xx above all)
    is a failed answer, its error led by its kind."""
    files = [str(f) for f in body_files(folder, jpegs)]
    text, cut, huge = map(str, body_files(folder, [b"this is not an image\n" * 20, jpegs[0][: len(jpegs[0]) // 2],
                                                   b"\0" * (max_upload_bytes + 1)]))  # fmt: skip
    bad = {"not_image": ["image", "notes.png", text, "image/png"], "truncated": ["image", "cut.jpg", cut, "image/jpeg"],
           "wrong_field": ["file", "x.jpg", files[0], "image/jpeg"], "too_big": ["image", "huge.png", huge, "image/png"]}  # fmt: skip
    cycle = tuple(mixed_request(i, files, bad) for i in range(math.lcm(len(CYCLE), len(files))))
    return Http(url, cycle, timeout_s)


def mixed_request(i: int, files: Sequence[str], bad: dict[str, list]) -> dict:
    """Request `i` of the MIX as a cycle entry of bench.locust_load."""
    kind, jpeg = kind_of(i), files[i % len(files)]
    parts = [bad[kind]] if kind in BAD else [["image", f"{i}.jpg", jpeg, "image/jpeg"]]
    if kind == "predict_batch":
        parts = [["images", f"{i}-{n}.jpg", files[(i + n) % len(files)], "image/jpeg"]
                 for n in range(BATCH_IMAGES)]  # fmt: skip
    path = {"predict_batch": "/predict_batch", "explain": "/explain"}.get(kind, "/predict")
    return {"path": path, "files": parts, "expect": "200" if kind in GOOD else "4xx", "label": kind}


def minute_rows(records: Sequence[Record], since: float, minutes: int, window_s: float = 60.0) -> list[dict]:
    """One row per minute (by scheduled start): requests, failures, 5xx, 4xx of bad
    inputs, client-side p50/p99 of the good kinds, and the p99 of /predict alone."""
    rows = []
    for m in range(minutes):
        start, end = since + m * window_s, since + (m + 1) * window_s
        batch = [r for r in records if start <= r.start < end]
        good = [r.latency_ms for r in batch if r.ok and kind_of(r.index) in GOOD]
        predict = [r.latency_ms for r in batch if r.ok and kind_of(r.index) == "predict"]
        rows.append({
            "minute": m + 1,
            "requests": len(batch),
            "failed": sum(not r.ok for r in batch),
            "status_5xx": sum(r.status is not None and r.status >= 500 for r in batch),
            "bad_4xx": sum(kind_of(r.index) in BAD and 400 <= (r.status or 0) < 500 for r in batch),
            **percentiles(good),
            "predict_p99_ms": percentiles(predict)["p99_ms"],
        })  # fmt: skip
    return rows


def rss_by_process(samples: Sequence[tuple[float, dict]]) -> dict[str, list[tuple[float, int]]]:
    """(time, RSS bytes) series of each process key of TreeSampler samples."""
    series: dict[str, list[tuple[float, int]]] = {}
    for at, usage in samples:
        for key, use in usage.items():
            series.setdefault(key, []).append((at, use.rss_bytes))
    return series


def _mean_rss(series: Sequence[tuple[float, int]], start: float, end: float) -> float | None:
    values = [rss for at, rss in series if start <= at <= end]
    return sum(values) / len(values) if values else None


def memory_growth(
    samples: Sequence[tuple[float, dict]], since: float, until: float, warm_up_s: float = WARM_UP_S
) -> dict[str, dict]:
    """Per process: mean RSS over the RSS_WINDOW_S before the end of warm-up and before
    `until`, and the growth between them (a fraction; None where a window is empty)."""
    out = {}
    mark = since + warm_up_s
    for key, series in rss_by_process(samples).items():
        warm = _mean_rss(series, mark - RSS_WINDOW_S, mark)
        end = _mean_rss(series, until - RSS_WINDOW_S, until)
        growth = (end - warm) / warm if warm and end is not None else None
        peak = max(rss for _, rss in series)
        minutes = [_mb(_mean_rss(series, t - RSS_WINDOW_S, t)) for t in _minute_ends(since, until)]
        out[key] = {"after_warm_up_mb": _mb(warm), "end_mb": _mb(end), "peak_mb": _mb(peak), "growth": growth,
                    "per_minute_mb": minutes}  # fmt: skip
    return out


def _minute_ends(since: float, until: float) -> list[float]:
    ends, t = [], since + 60
    while t <= until + 1:
        ends.append(min(t, until))
        t += 60
    return ends


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def targets(result: dict) -> list[tuple[bool, str]]:
    """(passed, line) for 0 responses 5xx, no failed request, flat memory, stable p99."""
    rows = result["minutes"]
    fives, failed = sum(r["status_5xx"] for r in rows), sum(r["failed"] for r in rows)
    checks = [
        (fives == 0, f"responses 5xx: {fives} (target 0)"),
        (failed == 0, f"requests failed (5xx, wrong status, no answer): {failed} (target 0)"),
    ]
    for key, mem in sorted(result["memory"].items()):
        growth = mem["growth"]
        ok = growth is not None and growth < GROWTH_LIMIT
        shown = "n/a" if growth is None else f"{growth:+.1%}"
        checks.append((ok, f"RSS of {key}: {ms(mem['after_warm_up_mb'], 0)} -> {ms(mem['end_mb'], 0)} MB, {shown} "
                           f"(target < {GROWTH_LIMIT:.0%})"))  # fmt: skip
    p99s = sorted(r["p99_ms"] for r in rows[1:] if r["p99_ms"] is not None) or [
        r["p99_ms"] for r in rows if r["p99_ms"] is not None
    ]
    if p99s:
        median, worst = p99s[len(p99s) // 2], p99s[-1]
        checks.append((worst <= P99_SPREAD_LIMIT * median,
                       f"p99 per minute (after the first): worst {worst:.0f} ms vs median {median:.0f} ms "
                       f"(target <= {P99_SPREAD_LIMIT:g}x)"))  # fmt: skip
    return checks


def with_targets(results: dict) -> dict:
    """The results with "targets" ({passed, check}) filled in."""
    return results | {"targets": [{"passed": ok, "check": line} for ok, line in targets(results["result"])]}


def render(results: dict) -> str:
    """The Markdown report: settings, the per-minute table, memory per process, targets."""
    result = results["result"]
    minutes = harness.table(
        ["minute", "requests", "failed", "5xx", "bad inputs 4xx", "p50 ms", "p99 ms", "/predict p99 ms", "load"],
        ([r["minute"], r["requests"], r["failed"], r["status_5xx"], r["bad_4xx"], ms(r["p50_ms"], 0),
          ms(r["p99_ms"], 0), ms(r["predict_p99_ms"], 0), f"{r.get('load', float('nan')):.2f}"]
         for r in result["minutes"]),
    )  # fmt: skip
    memory = sorted(result["memory"].items())
    growth = {key: "n/a" if mem["growth"] is None else f"{mem['growth']:+.1%}" for key, mem in memory}
    rss = harness.table(["process", "RSS after warm-up MB", "RSS at end MB", "peak MB", "growth"],
                        ([key, ms(mem["after_warm_up_mb"], 0), ms(mem["end_mb"], 0), ms(mem["peak_mb"], 0),
                          growth[key]] for key, mem in memory))  # fmt: skip
    lines = [f"soak: {results['settings']}", "", minutes, "", rss, "", "RSS per process at the end of each minute, MB (mean of its last 10 s):"]  # fmt: skip
    lines += [f"  {key}: {' '.join(ms(mb, 0) for mb in mem.get('per_minute_mb', []))}" for key, mem in memory]
    lines += ["", "targets:", *(f"  {'PASS' if ok else 'FAIL'} {line}" for ok, line in targets(result))]
    if result.get("first_errors"):
        lines.append(f"first failures: {result['first_errors']}")
    return "\n".join(lines)
