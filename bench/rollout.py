"""The rollout benchmark's analysis and report: pure functions over the load generator's
records (bench.loadgen.Record), the alias moves and the process sampler's samples.

Definitions (all times `perf_counter` seconds, the clock of the records and the moves):

- `first_new_s`: from the move to the end of the first answer computed by the new
  version among requests that started after the move (and ended before the next move:
  a fast next swap may answer a request still running then).
- `last_old_s`: from the move to the end of the last answer computed by the old version
  among those requests: the switch is complete then. None when no request started
  after the move got the old version.
- the swap window of a move: from the move until 2 s (`SETTLE_S`) after its last old
  answer (after its first new answer when no old one came). Requests that *started* in
  it count for the swap p99; requests that neither start nor end in any swap window,
  after the warm-up, count for the steady p99.

`wait_switched` watches the records as they arrive, so the benchmark can wait until every
client is answered by the new version before the next move.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import fmean as mean

from bench import harness
from bench.harness import ms, percentiles
from bench.loadgen import Record

# The swap window runs this long past the last old answer: requests queued behind the
# swap (the new model's first batches) still count as "during the swap".
SETTLE_S = 2.0


@dataclass(frozen=True)
class Move:
    """One alias move: when the benchmark called set_registered_model_alias, from which
    version to which, and how long the call took."""

    at: float
    old: str
    new: str
    kind: str  # "promote" or "rollback"
    call_ms: float = 0.0
    # The service's own load of the new version (download, load, check, warm-up), from
    # /metadata once it switched; None when it did not say.
    service_load_s: float | None = None


def move_timing(records: Iterable[Record], move: Move, until: float = float("inf")) -> dict:
    """first_new_s, last_old_s (see the module docstring), the requests started after the
    move and answered before `until` (the next move), old answers that ended after the first new one
    (requests that had read the old model before the swap), answers by any other version,
    and the latency of the first new answer (the new model's first batch)."""
    # Requests still running at the next move are left out: the next swap may answer them.
    after = [r for r in records if r.ok and move.at <= r.start and r.end < until]
    new = [r.end for r in after if r.version == move.new]
    old = [r.end for r in after if r.version == move.old]
    first = min((r for r in after if r.version == move.new), key=lambda r: r.end, default=None)
    return {
        **asdict(move),
        "requests": len(after),
        "first_new_s": first.end - move.at if first else None,
        "first_new_latency_ms": first.latency_ms if first else None,
        "last_old_s": max(old) - move.at if old else None,
        "old_after_first_new": sum(end > min(new) for end in old) if new else 0,
        "other_versions": sum(r.version not in (move.old, move.new) for r in after),
    }


def swap_window(timing: dict) -> tuple[float, float]:
    """(start, end) of one move's swap window, from its `move_timing`."""
    done = max(timing["last_old_s"] or 0.0, timing["first_new_s"] or 0.0)
    return timing["at"], timing["at"] + done + SETTLE_S


def _inside(t: float, windows: Sequence[tuple[float, float]]) -> bool:
    return any(start <= t < end for start, end in windows)


def steady_records(records: Iterable[Record], windows, since: float, until: float) -> list[Record]:
    """Requests in [since, until) that neither start nor end inside a swap window (and do
    not span one)."""
    return [
        r for r in records
        if since <= r.start and r.end < until and not _inside(r.start, windows)
        and not _inside(r.end, windows) and not any(r.start < s and r.end >= e for s, e in windows)
    ]  # fmt: skip


def latency(records: Iterable[Record]) -> dict:
    """Requests, failures and p50/p95/p99 ms of the answered ones."""
    records = list(records)
    ok = [r.latency_ms for r in records if r.ok]
    return {"requests": len(records), "failed": len(records) - len(ok), **percentiles(ok)}


def split_usage(samples: Sequence[tuple[float, dict]], windows, since: float, until: float) -> dict:
    """CPU seconds per role and peak RSS (tree total and per role), in the swap windows
    and at steady state, from bench.sampling.TreeSampler samples (time, {role: Usage}).

    The CPU used between two samples goes to the swap side when the midpoint of the two
    lies in a swap window; `cores` is CPU seconds per wall second.
    """
    out = {side: {"seconds": 0.0, "cpu_s": {}, "peak_rss_bytes": 0, "peak_rss_by_role": {}}
           for side in ("swap", "steady")}  # fmt: skip
    for (t0, u0), (t1, u1) in zip(samples, samples[1:], strict=False):
        if t0 < since or t1 > until:
            continue
        side = out["swap" if _inside((t0 + t1) / 2, windows) else "steady"]
        side["seconds"] += t1 - t0
        for role, usage in u1.items():
            spent = max(0.0, usage.cpu_s - (u0[role].cpu_s if role in u0 else 0.0))
            side["cpu_s"][role] = side["cpu_s"].get(role, 0.0) + spent
        side["peak_rss_bytes"] = max(side["peak_rss_bytes"], sum(u.rss_bytes for u in u1.values()))
        for role, usage in u1.items():
            side["peak_rss_by_role"][role] = max(side["peak_rss_by_role"].get(role, 0), usage.rss_bytes)
    for side in out.values():
        seconds = side["seconds"]
        side["cores"] = {role: cpu / seconds for role, cpu in side["cpu_s"].items()} if seconds else {}
    return out


def images_per_s(records: Iterable[Record], windows) -> dict:
    """Answered requests per second whose end falls in the swap windows, and elsewhere
    within the same span (the throughput the swaps cost)."""
    records = [r for r in records if r.ok]
    if not records:
        return {"swap": None, "steady": None}
    span = max(r.end for r in records) - min(r.start for r in records)
    in_swap = sum(_inside(r.end, windows) for r in records)
    swap_s = sum(end - start for start, end in windows)
    return {
        "swap": in_swap / swap_s if swap_s else None,
        "steady": (len(records) - in_swap) / (span - swap_s) if span > swap_s else None,
    }


def analyse(records: Sequence[Record], moves: Sequence[Move], samples, since: float, until: float,
            poll_interval_s: float, load_s: float) -> dict:  # fmt: skip
    """Everything the report shows for one model: counts, per-move timings against the
    target (poll interval + load time + 1 s), p99 in the swap windows vs steady, CPU and
    memory in the swap windows vs steady."""
    ends = [m.at for m in moves[1:]] + [float("inf")]
    timings = [move_timing(records, m, end) for m, end in zip(moves, ends, strict=True)]
    for timing, move in zip(timings, moves, strict=True):
        # Per move: the poll interval + the load as the service timed it, under the load.
        timing["service_load_s"] = move.service_load_s
        used = load_s if move.service_load_s is None else move.service_load_s
        timing["target_s"] = poll_interval_s + used + 1.0
    windows = [swap_window(t) for t in timings]
    for timing, window in zip(timings, windows, strict=True):
        inside = [r.latency_ms for r in records if r.ok and window[0] <= r.start < window[1]]
        timing["window_p99_ms"] = percentiles(inside)["p99_ms"]
        timing["window_max_ms"] = max(inside, default=None)
    swap = latency(r for r in records if _inside(r.start, windows))
    return {
        "requests": len(records),
        "failed": sum(not r.ok for r in records),
        "first_error": next((r.error for r in records if not r.ok), None),
        "target_s": poll_interval_s + load_s + 1.0,
        "load_s": load_s,
        "poll_interval_s": poll_interval_s,
        "moves": timings,
        "swap": swap,
        "steady": latency(steady_records(records, windows, since, until)),
        "images_per_s": images_per_s([r for r in records if r.start >= since], windows),
        "usage": split_usage(samples, windows, since, until),
    }


def targets(key: str, result: dict) -> list[tuple[bool, str]]:
    """The issue's targets for one model, as (passed, line)."""
    moves = result["moves"]
    limits = [m.get("target_s", result["target_s"]) for m in moves]
    first = [m["first_new_s"] for m in moves]
    last = [m["last_old_s"] or 0.0 for m in moves]
    over_first = sum(f is None or f > x for f, x in zip(first, limits, strict=True))
    over_last = sum(t > x for t, x in zip(last, limits, strict=True))
    limit = _target_text(limits)
    swap, steady = result["swap"]["p99_ms"], result["steady"]["p99_ms"]
    ratio = swap / steady if swap and steady else float("inf")
    checks = [
        (result["failed"] == 0 and result["requests"] >= 2000,
         f"{result['failed']} failed of {result['requests']} requests (0 of >= 2,000)"),
        (over_first == 0,
         f"first answer by the new version <= {limit} on every move: max {_max(first)}, over on {over_first}"),
        (over_last == 0,
         f"last answer by the old version <= {limit} on every move: max {_max(last)}, over on {over_last}"),
        (ratio <= 2, f"p99 in swap windows {ms(swap, 0)} ms <= 2x steady {ms(steady, 0)} ms ({ratio:.2f}x)"),
    ]  # fmt: skip
    return [(ok, f"{key}: {line}") for ok, line in checks]


def _target_text(limits: list[float]) -> str:
    """'7.5 s', or '6.2-9.1 s (poll + the service's load of each move + 1)'."""
    low, high = min(limits, default=0.0), max(limits, default=0.0)
    if high - low < 0.05:
        return f"{high:.1f} s"
    return f"{low:.1f}-{high:.1f} s (poll + the service's own load of that move + 1)"


def where_time_goes(key: str, result: dict) -> list[str]:
    """NOTE lines splitting a switch: move -> last old answer (poll wait, the load beside
    the old model, one batch), last old -> first new answer (the new model's first batch),
    and the CPU and throughput of the swap windows against steady state."""
    moves = [m for m in result["moves"] if m["first_new_s"] is not None]
    if not moves:
        return []
    last_old = mean([m["last_old_s"] or 0.0 for m in moves])
    gap = mean([m["first_new_s"] - (m["last_old_s"] or 0.0) for m in moves])
    first_ms = mean([m["first_new_latency_ms"] for m in moves])
    usage, rate = result["usage"], result["images_per_s"]
    cores = {side: usage[side]["cores"] for side in ("swap", "steady")}
    lines = [
        f"move -> last old answer {last_old:.2f} s on average (poll wait ~{result['poll_interval_s'] / 2:g} s "
        f"+ load and warm-up beside the old model, {result['load_s']:.1f} s before the load, + one batch); "
        f"last old -> first new answer {gap:.2f} s: the new model's first answer took {first_ms:.0f} ms "
        f"(steady p50 {ms(result['steady']['p50_ms'], 0)} ms)",
        "CPU cores of the server's processes, swap / steady: "
        + ", ".join(
            f"{role} {cores['swap'].get(role, 0):.2f} / {cores['steady'].get(role, 0):.2f}"
            for role in ("model", "front")
        ),  # fmt: skip
    ]
    if rate["swap"] and rate["steady"]:
        lines[-1] += f"; images/s {rate['swap']:.1f} / {rate['steady']:.1f}"
    return [f"{key}: {line}" for line in lines]


def _max(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    missing = len(values) - len(known)
    return (f"{max(known):.2f} s" if known else "-") + (f" ({missing} never switched)" if missing else "")


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def moves_table(results: dict) -> str:
    """Markdown: one row per alias move of every model."""
    header = ["model", "#", "move", "requests after", "first new s", "last old s", "target s", "old after first new",
              "first new answer ms", "window p99 ms", "window max ms"]  # fmt: skip
    rows = []
    for key, result in results.items():
        for n, m in enumerate(result["moves"], 1):
            load = "" if m.get("service_load_s") is None else f" (load {m['service_load_s']:.1f})"
            rows.append([key, n, f"{m['kind']} v{m['old']} -> v{m['new']}", m["requests"], ms(m["first_new_s"], 2),
                         ms(m["last_old_s"], 2), f"{m.get('target_s', result['target_s']):.1f}{load}",
                         m["old_after_first_new"], ms(m.get("first_new_latency_ms"), 0), ms(m["window_p99_ms"], 0),
                         ms(m.get("window_max_ms"), 0)])  # fmt: skip
    return harness.table(header, rows)


def summary_table(results: dict) -> str:
    """Markdown: one row per model: counts, worst switch times, p99, memory, model CPU."""
    header = ["model", "requests", "failed", "target s (poll + load + 1)", "max first new s", "max last old s",
              "p99 ms swap / steady", "images/s swap / steady", "peak RSS MiB swap / steady",
              "model proc. RSS MiB swap / steady", "model proc. cores swap / steady"]  # fmt: skip
    rows = []
    for key, r in results.items():
        usage, sides = r["usage"], ("swap", "steady")
        rows.append([
            key, r["requests"], r["failed"], f"{r['target_s']:.1f} ({r['poll_interval_s']:g} + {r['load_s']:.1f} + 1)",
            _max([m["first_new_s"] for m in r["moves"]]), _max([m["last_old_s"] for m in r["moves"]]),
            " / ".join(ms(r[side]["p99_ms"], 0) for side in sides),
            " / ".join(ms(r["images_per_s"][side]) for side in sides),
            " / ".join(_mib(usage[side]["peak_rss_bytes"]) for side in sides),
            " / ".join(_mib(usage[side]["peak_rss_by_role"].get("model", 0)) for side in sides),
            " / ".join(ms(usage[side]["cores"].get("model"), 2) for side in sides),
        ])  # fmt: skip
    return harness.table(header, rows)


def with_targets(report: dict) -> dict:
    """The report with "targets" ({passed, check}) filled in."""
    checks = [(ok, line) for key, result in report["results"].items() for ok, line in targets(key, result)]
    return report | {"targets": [{"passed": ok, "check": line} for ok, line in checks]}


def render(report: dict) -> str:
    """The printed report: machine, both tables, PASS/FAIL lines."""
    parts = [
        f"Images: {report['images']}. Load time: {report['load_time_how']}\n",
        summary_table(report["results"]),
        "",
        moves_table(report["results"]),
        "",
    ]
    for key, result in report["results"].items():
        if runtime := result.get("runtime"):
            parts.append(f"{key} served by {runtime['name']} {runtime['precision']} ({runtime['reason']})")
        parts += [f"{'PASS' if ok else 'FAIL'} {line}" for ok, line in targets(key, result)]
        parts += [f"NOTE {line}" for line in where_time_goes(key, result)]
    return "\n".join(parts)


def switched(records: Sequence[Record], version: str, since: float, hold_s: float, now: float) -> bool:
    """True once every answer that ended in the last `hold_s` seconds (at least one, and
    all after `since`) came from `version`; `records` in arrival order (a Locust's, live)."""
    recent = [r for r in records[-2000:] if r.end >= max(since, now - hold_s)]
    return now - hold_s >= since and bool(recent) and all(r.version == version for r in recent)


def wait_switched(records, version: str, since: float, hold_s: float, timeout_s: float, stop=None) -> bool:
    """Wait until `switched`; False after `timeout_s` (or once `stop` is set)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline and not (stop and stop.is_set()):
        if switched(records, version, since, hold_s, time.perf_counter()):
            return True
        time.sleep(0.1)
    return False
