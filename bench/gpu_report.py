"""The GPU benchmark's Markdown report: pure functions over the results dict that
bench.gpu_bench writes as gpu_bench.json."""

from __future__ import annotations

import datetime

from bench import harness
from bench.harness import ms

ROLES = ("client", "front", "model")
# Issue 11's targets on one H200 (ResNet50 at 224, JPEG in, JSON out).
TARGET_RATE, TARGET_P99_MS, TARGET_RATIO = 2000, 50, 0.8


def model_row(m: dict, precision: str, batch: int) -> dict | None:
    """The in-process row of one precision and batch size, or None."""
    for run in m:
        if run["precision"] == precision:
            return next((r for r in run["rows"] if r["batch"] == batch), None)
    return None


def reference(results: dict, row: dict) -> dict | None:
    """The in-process row a service level is compared with: same precision, batch equal
    to the concurrency, else the largest batch not above the service's max batch."""
    runs = [r for r in results["model"] if r["precision"] == row["precision"]]
    if not runs:
        return None
    top = results["settings"]["max_batch_size"]
    batches = sorted(r["batch"] for r in runs[0]["rows"])
    wanted = (
        row["concurrency"]
        if row["concurrency"] in batches
        else max([b for b in batches if b <= top] or batches)
    )
    return model_row(results["model"], row["precision"], wanted)


def main_table(results: dict) -> list[str]:
    header = ["what", "precision", "batch / concurrency", "images/s", "p50 ms", "p95 ms", "p99 ms", "GPU util %",
              "GPU MiB", "CPU ms/image " + " / ".join(ROLES), "mean batch", "vs in-process", "errors"]  # fmt: skip
    rows = [["in-process `Predictor.probabilities`", run["precision"], f"batch {r['batch']}",
             *(ms(r[k]) for k in ("images_per_s", "p50_ms", "p95_ms", "p99_ms")), *["-"] * 5, "0"]
            for run in results["model"] for r in run["rows"]]  # fmt: skip
    for row in results["service"]:
        ref = reference(results, row)
        ratio = f"{row['images_per_s'] / ref['images_per_s']:.2f}x of batch {ref['batch']}" if ref else "-"
        cpu = row.get("cpu_ms_per_image", {})
        errors = str(row["errors"]) + (f" ({row['first_error'][:60]})" if row["errors"] else "")
        rows.append(["service POST /predict", row["precision"], f"c={row['concurrency']}",
                     *(ms(row[k]) for k in ("images_per_s", "p50_ms", "p95_ms", "p99_ms")),
                     ms(row.get("gpu_util_pct"), 0), ms(row.get("gpu_mem_mib"), 0),
                     " / ".join(ms(cpu.get(g)) for g in ROLES), ms(row.get("server", {}).get("mean_batch")), ratio,
                     errors])  # fmt: skip
    return harness.table(header, rows).splitlines()


def capacities(results: dict) -> list[tuple[str, float | None, float | None, str]]:
    """(stage, ms per image, images/s that stage allows, how) for the top service level."""
    s, st = results["settings"], results.get("stages") or {}
    fronts, procs = s["front_workers"], s["client_procs"]
    rows = [
        ("JPEG decode (front, CPU)", st.get("decode_ms"), None, f"x {fronts} fronts"),
        ("resize, size seen before (front, CPU)", st.get("resize_ms"), None, f"x {fronts} fronts"),
    ]
    rows = [(n, ms, fronts * 1000 / ms if ms else None, how) for n, ms, _, how in rows]
    # Paid once per input size and front (a resize traced per shape): not a steady rate.
    rows.append(
        ("resize, first time a size is seen", st.get("resize_first_ms"), None, "once per size and front")
    )
    top = max(results["service"], key=lambda r: r["concurrency"], default=None)
    m = reference(results, top) if top else None
    if m:
        if m.get("transfer_ms") is not None:
            per = m["transfer_ms"] / m["batch"]
            rows.append(
                ("host-to-device copy, float32", per, 1000 / per if per else None, f"batch {m['batch']}")
            )
        rows.append(
            (
                "model forward pass",
                1000 / m["images_per_s"],
                m["images_per_s"],
                f"in-process, batch {m['batch']}",
            )
        )
    if top:
        cpu = top.get("cpu_ms_per_image", {})
        for role, n, how in (("front", fronts, f"{fronts} processes"), ("model", 1, "one process (GIL)"),
                             ("client", procs, f"{procs} load-generator processes")):  # fmt: skip
            ms = cpu.get(role)
            rows.append(
                (f"{role} process, all its CPU work (measured)", ms, n * 1000 / ms if ms else None, how)
            )
    return rows


def stage_table(results: dict) -> list[str]:
    rows = [[name, ms(per, 2), ms(cap, 0), how] for name, per, cap, how in capacities(results)]
    return harness.table(["stage", "ms per image", "allows images/s", "how"], rows).splitlines()


def verdict(results: dict) -> list[str]:
    """The limiting stage, and the issue's targets as PASS/FAIL lines (GPU only)."""
    caps = [(cap, name) for name, _, cap, _ in capacities(results) if cap]
    out = []
    if caps:
        cap, name = min(caps)
        out.append(f"Limiting stage: **{name}**, about {cap:.0f} images/s.")
    by_c = {r["concurrency"]: r for r in results["service"] if r["precision"] == "float32"}
    top = by_c.get(max(by_c, default=0))
    if top:
        ref = reference(results, top)
        if ref:
            out.append(f"Service at c={top['concurrency']}: {top['images_per_s']:.0f} images/s = "
                       f"{top['images_per_s'] / ref['images_per_s']:.2f}x the model's own at batch {ref['batch']} "
                       f"(target {TARGET_RATIO}x).")  # fmt: skip
    if results["machine"].get("gpu"):
        if 128 in by_c:
            ok = by_c[128]["images_per_s"] >= TARGET_RATE
            out.append(
                f"{'PASS' if ok else 'FAIL'} c=128: {by_c[128]['images_per_s']:.0f} images/s >= {TARGET_RATE}"
            )
        if 32 in by_c and by_c[32]["p99_ms"] is not None:
            ok = by_c[32]["p99_ms"] < TARGET_P99_MS
            out.append(
                f"{'PASS' if ok else 'FAIL'} c=32: p99 {by_c[32]['p99_ms']:.1f} ms < {TARGET_P99_MS} ms"
            )
    else:
        out.append("No GPU: CPU figures (the issue's targets are for one H200 and are not checked).")
    return out


def render(results: dict) -> str:
    """The whole Markdown report."""
    m, s = results["machine"], results["settings"]
    v = m["versions"]
    head = [
        f"# GPU benchmark: ResNet50 at {s['size']}, JPEG in, JSON out ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {m.get('gpu') or 'no GPU'}; {m['cpu']}, {m['cores']} cores; Python {m['python']}; "
        + ", ".join(f"{k} {v[k].split(' ')[0]}" for k in ("jax", "keras", "bentoml", "numpy")),
        f"Devices of the model process: {results['model'][0]['device'] if results['model'] else '-'}. "
        f"Service: {s['front_workers']} front processes, one model process, max batch {s['max_batch_size']}, "
        f"{s['client_procs']} load-generator processes, {s['level_seconds']:g} s per level.",
        f"Images: {results.get('images', '-')}.",
        "",
    ]
    lines = (
        head
        + main_table(results)
        + ["", "Where the time goes (top service level):", ""]
        + stage_table(results)
    )
    failures = [f"FAILED {line}" for line in results.get("failures", [])]
    seconds = f"\n{results.get('seconds', 0):.0f} s in all."
    return "\n".join([*lines, "", *verdict(results), *failures, seconds, ""])
