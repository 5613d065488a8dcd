"""The serving benchmark's report: Markdown tables, targets and the printed summary, as
pure functions over its results dict (the JSON `bench.serve_bench` writes).

`results` maps a case ("resnet50", "demo") to its rows: "a" the in-process rows
(`method` predict or predict_on_batch, `batch`), "b", "c", "d" one row per concurrency
level (bench.loadgen.run_level's keys, plus server-side columns for "b" and "c").
"""

from __future__ import annotations

NAMES = {
    "predict": "(a) in-process model.predict",
    "predict_on_batch": "(a') in-process predict_on_batch",
    "b": "(b) service, adaptive batching",
    "c": "(c) service, batching off",
    "d": "(d) mlflow models serve (client decodes)",
}
# CPU per image columns of the breakdown, in this order.
GROUPS = ("client", "front", "model", "server")


def best_raw(result: dict, method: str = "predict") -> dict:
    """The fastest in-process row of one method: (a) `predict`, (a') `predict_on_batch`."""
    return max((r for r in result["a"] if r.get("method", "predict_on_batch") == method),
               key=lambda r: r["images_per_s"])  # fmt: skip


def level(rows: list[dict], concurrency: int) -> dict | None:
    """The row of one concurrency level, or None."""
    return next((r for r in rows if r["concurrency"] == concurrency), None)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(row: dict, other: dict | None) -> str:
    if not other or not other["images_per_s"]:
        return "-"
    return f"{row['images_per_s'] / other['images_per_s']:.2f}x"


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(results: dict) -> str:
    """Markdown: one row per case, model and level; ratios on the (b) rows."""
    lines = [
        "| case | model | concurrency | images/s | p50 ms | p95 ms | p99 ms | b/a | b/a' | b/d |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, result in results.items():
        best = best_raw(result)["images_per_s"]
        strict = best_raw(result, "predict_on_batch")["images_per_s"]
        for case in "abcd":
            for row in result[case]:
                name = NAMES[row.get("method", "predict_on_batch")] if case == "a" else NAMES[case]
                where = f"batch {row['batch']}" if case == "a" else str(row["concurrency"])
                ratios = ["", "", ""]
                if case == "b":
                    d = level(result["d"], row["concurrency"])
                    rate = row["images_per_s"]
                    ratios = [f"{rate / best:.2f}x", f"{rate / strict:.2f}x", _ratio(row, d)]
                flag = " (capped)" if row.get("capped") else ""
                flag += f" ({row['errors']} errors)" if row.get("errors") else ""
                cells = [name, key, where, f"{row['images_per_s']:.1f}{flag}"]
                cells += [_ms(row[p]) for p in ("p50_ms", "p95_ms", "p99_ms")] + ratios
                lines.append(_line(cells))
    return "\n".join(lines)


def breakdown(results: dict) -> str:
    """Markdown: client p50 vs the server's own access-log times, and CPU per image by
    process, per service level; CPU per image of (a) and (d) too."""
    lines = [
        "| case | model | concurrency | client p50 ms | front /predict p50 ms | model /classify p50 ms "
        "| mean batch | non-200 | CPU ms/image: " + " / ".join(GROUPS) + " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, result in results.items():
        for row in result["a"]:
            cpu = row.get("cpu_ms_per_image", {}).get("in-process")
            name = NAMES[row.get("method", "predict_on_batch")].split(" in-process")[0]
            lines.append(_line([name, key, f"batch {row['batch']}", *["-"] * 5, f"in process {_ms(cpu)}"]))
        for case in "bcd":
            lines += [_line(_breakdown_cells(case, key, row)) for row in result[case]]
    return "\n".join(lines)


def _breakdown_cells(case: str, key: str, row: dict) -> list[str]:
    cells = [f"({case})", key, str(row["concurrency"]), _ms(row["p50_ms"])]
    cells += [_ms(row.get("front_predict_ms_p50")), _ms(row.get("model_classify_ms_p50"))]
    cells.append(_ms(row.get("mean_batch")))
    non200 = [row.get(f"{x}_non200") for x in ("front_predict", "model_classify")]
    cells.append("-" if case == "d" else " / ".join(map(str, non200)))
    cpu = row.get("cpu_ms_per_image", {})
    cells.append(" / ".join(_ms(cpu.get(g)) for g in GROUPS))
    return cells


def targets(key: str, result: dict, top: int) -> list[tuple[bool | None, str]]:
    """The issue's targets for one model, as (passed, line); None marks a figure that is
    reported beside them but is not one of them."""
    b, c, d = (level(result[x], top) for x in "bcd")
    best = best_raw(result)["images_per_s"]
    strict = best_raw(result, "predict_on_batch")["images_per_s"]
    checks: list[tuple[bool | None, str]] = [
        (
            b["images_per_s"] >= 0.85 * best,
            f"(b) c={top} {b['images_per_s']:.1f}/s >= 0.85x (a) model.predict best {best:.1f}/s "
            f"({b['images_per_s'] / best:.2f}x)",
        ),
        (
            None,
            f"(b) c={top} is {b['images_per_s'] / strict:.2f}x (a') predict_on_batch best {strict:.1f}/s "
            "(stricter than the issue's (a))",
        ),
        (b["images_per_s"] >= 3 * d["images_per_s"], f"(b) c={top} >= 3x (d) {d['images_per_s']:.1f}/s"),
        (b["images_per_s"] > c["images_per_s"], f"(b) c={top} beats (c) {c['images_per_s']:.1f}/s"),
    ]
    b1 = level(result["b"], 1)
    # The model's own latency: the call the service makes, predict_on_batch, at batch 1.
    a1 = next((r for r in result["a"] if r["batch"] == 1 and r.get("method") != "predict"), None)
    if b1 and a1 and b1["p50_ms"] is not None:
        added = b1["p50_ms"] - a1["p50_ms"]
        checks.append(
            (added < 15, f"c=1: service adds {added:.1f} ms to the model's p50 {a1['p50_ms']:.1f} ms (< 15)")
        )
    failed = sum(row["errors"] for x in "bc" for row in result[x])
    checks.append((not failed, f"(b) and (c) answer every request: {failed} failed"))
    return [(ok, f"{key}: {line}") for ok, line in checks]


def all_targets(results: dict, top: int) -> list[tuple[bool | None, str]]:
    """`targets` of every case, in order."""
    return [check for key, result in results.items() for check in targets(key, result, top)]


def with_targets(report: dict, top: int) -> dict:
    """The report with "targets" ({passed, check}) and "notes" (lines) filled in."""
    checks = all_targets(report["results"], top)
    return report | {
        "targets": [{"passed": ok, "check": line} for ok, line in checks if ok is not None],
        "notes": [line for ok, line in checks if ok is None],
    }


def render(report: dict, top: int, out: str) -> str:
    """The whole printed report: machine, both tables, per-case notes, PASS/FAIL/NOTE
    lines and where the JSON went (`out`)."""
    m = report["machine"]
    parts = [
        f"\nMachine: {m['cpu']}, {m['cores']} cores, keras {m['keras']}, mlflow {m['mlflow']}, bentoml {m['bentoml']}",
        f"Load average: {m['load_average_at_start']:.1f} at start, {report['load_average_at_end']:.1f} at end",
        f"Images: {report['images']}. (d): the client decodes and resizes each JPEG with",
        "imgcls.images.load_image before timing and sends a JSON tensor (MLflow takes no image upload).\n",
        table(report["results"]),
        "\nWhere the time goes (server times from the service's access log; CPU per answered",
        "image of the load generator, the service's HTTP front and model processes, MLflow's server):\n",
        breakdown(report["results"]),
        "",
    ]
    for key, result in report["results"].items():
        gaps = ", ".join(f"{x} {result[f'{x}_max_prob_gap']:.1e}" for x in "bcd")
        parts.append(f"{key}: decode+resize p50 {result['preprocess_ms_p50']:.1f} ms; mlflow body "
                     f"{result['mlflow_body_kb']:.0f} KiB; max |p - p(a)|: {gaps}")  # fmt: skip
    for ok, line in all_targets(report["results"], top):
        parts.append(f"{'NOTE' if ok is None else 'PASS' if ok else 'FAIL'} {line}")
    parts.append(f"\n{report['seconds']:.0f} s in all; JSON: {out}")
    return "\n".join(parts)
