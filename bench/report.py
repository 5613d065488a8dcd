"""The serving report: Markdown tables, targets and the printed summary, as pure functions
over its results dict (the JSON `bench.serve_bench` writes).

`results` maps a case ("resnet50", "demo") to: "a", the in-process rows (`method` predict,
predict_on_batch, or a compiled engine such as openvino-f32, `batch`); "rounds", one row
per server, round and step (bench.rounds: `server`, `round`, `step`, `concurrency`,
bench.loadgen.run_level's keys, and for the service its access-log columns; the
model's own rows with `before`); "max_prob_gap" per server; "runtime", what computes each
server's answers (/metadata "runtime": name, precision, reason).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from bench import harness
from bench.harness import ms

# The peers serving the Keras model, as their users do: issue 10's targets compare with
# them (mlflow is shown beside them, not raced); issue 20's with LitServe on Keras and on
# the same compiled build.
PEERS = ("litserve", "ray")
KERAS_PEER = "litserve"
COMPILED_PEER = "litserve-ov"
# The service as `imgcls serve` runs it: the default (two processes, `--runtime auto`),
# the compiled build in f32, Keras (the path before issue 20), `--one-process`.
SERVICES = ("imgcls", "imgcls-base", "imgcls-f32", "imgcls-keras", "imgcls-1p")
# The rows of the model itself in process (batch 1, at the c=1 steps of each round), with
# Keras; with a compiled build, `model openvino-f32` and so on (`model_name`).
MODEL = "model"
KERAS = "keras"
# CPU per image columns of the breakdown, in this order.
GROUPS = ("client", "front", "model", "server")
# Issue 10's bounds: what the service may add to a lone request, and its share of the
# model's own throughput at batch 32.
MAX_ADDED_MS = 5.0
MIN_SHARE_OF_MODEL = 0.95
# Issue 20's bounds, on medians over rounds. The f32 build: images/s at COMPILED_LEVELS at
# least F32_SPEEDUP x LitServe on Keras and SHARE_OF_COMPILED_PEER x LitServe on the same
# build; its c=1 p50 at most F32_LONE_SHARE x LitServe's on Keras. bf16: images/s at c=32
# at least BF16_SPEEDUP x LitServe on Keras.
COMPILED_LEVELS = (32, 128)
F32_SPEEDUP = 1.3
SHARE_OF_COMPILED_PEER = 0.9
F32_LONE_SHARE = 0.6
BF16_SPEEDUP = 3.0
# The CPU flags that decide what the compiled build can use, printed with the machine.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def in_process(result: dict, batch: int, method: str = "predict_on_batch") -> dict | None:
    """The in-process row of one method at one batch size."""
    return next((r for r in result["a"] if r["batch"] == batch and r.get("method") == method), None)


def engine(result: dict, server: str) -> str:
    """What computes a server's answers: `keras`, or the compiled build (`openvino-f32`,
    `openvino-bf16`), from its recorded runtime (none recorded: Keras)."""
    runtime = result.get("runtime", {}).get(server)
    if not runtime or runtime["name"] == KERAS:
        return KERAS
    return f"{runtime['name']}-{runtime['precision']}"


def engine_method(engine: str) -> str:
    """The in-process rows' method of an engine: `predict_on_batch` for Keras."""
    return "predict_on_batch" if engine == KERAS else engine


def model_name(engine: str) -> str:
    """The name of the model's own rows in the rounds with one engine."""
    return MODEL if engine == KERAS else f"{MODEL} {engine}"


def servers(result: dict) -> list[str]:
    """The servers of a case, in the order they ran."""
    return list(dict.fromkeys(r["server"] for r in result["rounds"]))


def steps(result: dict) -> list[tuple[int, int]]:
    """(step, concurrency) of a round, in order."""
    return sorted({(r["step"], r["concurrency"]) for r in result["rounds"]})


def rows_of(result: dict, server: str, step: int | None = None, concurrency: int | None = None) -> list[dict]:
    """One server's rows of one step (a row per round), or of every step at one concurrency."""
    return [r for r in result["rounds"] if r["server"] == server and step in (None, r["step"])
            and concurrency in (None, r["concurrency"])]  # fmt: skip


def spread(rows: list[dict], key: str) -> tuple[float, float, float] | None:
    """(min, median, max) of `key` over rows (rounds); None when none has it."""
    values = [v for r in rows if (v := _get(r, key)) is not None]
    return (min(values), statistics.median(values), max(values)) if values else None


def _get(row: dict, key: str):
    """`key` of a row; "cpu:GROUP": its CPU ms per image of that group; "server_cpu": of all
    groups but the client."""
    cpu = row.get("cpu_ms_per_image") or {}
    if key == "server_cpu":
        return sum(v for g, v in cpu.items() if g != "client") if cpu else None
    return cpu.get(key[4:]) if key.startswith("cpu:") else row.get(key)


def median_of(result: dict, server: str, concurrency: int, key: str) -> float | None:
    """The median of `key` over every round and step of one server at one concurrency."""
    s = spread(rows_of(result, server, concurrency=concurrency), key)
    return None if s is None else s[1]


def _spread_cell(rows: list[dict], key: str) -> str:
    s = spread(rows, key)
    return "-" if s is None else " / ".join(f"{v:.1f}" for v in s)


def _levels(results: dict):
    """(case, server, step, concurrency, rows of the rounds) of every measured level."""
    for key, result in results.items():
        for server in servers(result):
            for step, concurrency in steps(result):
                if rows := rows_of(result, server, step):
                    yield key, server, step, concurrency, rows


def table(results: dict) -> str:
    """Markdown: the model in process, then each server's levels in round order, each cell
    min / median / max across rounds."""
    header = ["case", "server", "step", "concurrency", "images/s min / med / max", "p50 ms min / med / max",
              "p99 ms min / med / max", "errors"]  # fmt: skip
    rows = [[key, f"in process {row['method']}", "-", f"batch {row['batch']}", f"{row['images_per_s']:.1f}",
             ms(row["p50_ms"]), ms(row["p99_ms"]), "0"] for key, result in results.items() for row in result["a"]]  # fmt: skip
    for key, server, step, concurrency, level in _levels(results):
        errors = sum(r["errors"] for r in level) + sum(bool(r.get("capped")) for r in level)
        cells = [_spread_cell(level, k) for k in ("images_per_s", "p50_ms", "p99_ms")]
        rows.append([key, server, step, concurrency, *cells, errors])
    return harness.table(header, rows)


BREAKDOWN = ("p50_ms", "front_predict_ms_p50", "model_classify_ms_p50", "forward_ms_mean", "mean_batch")


def breakdown(results: dict) -> str:
    """Markdown: where the time goes, medians across rounds: client p50 beside the
    service's own access-log times and mean batch, CPU ms per image of each process group."""
    header = ["case", "server", "step", "concurrency", "client p50 ms", "front /predict p50 ms",
              "model /classify p50 ms", "forward pass mean ms", "mean batch", "CPU ms/image: " + " / ".join(GROUPS)]  # fmt: skip
    rows = []
    for key, result in results.items():
        for method in dict.fromkeys(r["method"] for r in result["a"] if r.get("method") != "predict"):
            for batch in (1, 32):
                if row := in_process(result, batch, method):
                    cpu = row.get("cpu_ms_per_image", {}).get("in-process")
                    rows.append(
                        [
                            key,
                            f"in process {method}",
                            "-",
                            f"batch {batch}",
                            *["-"] * 5,
                            f"in process {ms(cpu)}",
                        ]
                    )
    for key, server, step, concurrency, level in _levels(results):
        medians = [ms(s and s[1]) for k in BREAKDOWN for s in [spread(level, k)]]
        cpu = " / ".join(ms(s and s[1]) for g in GROUPS for s in [spread(level, f"cpu:{g}")])
        rows.append([key, server, step, concurrency, *medians, cpu])
    return harness.table(header, rows)


def _cpu(result: dict, server: str, concurrency: int) -> dict[str, float]:
    """Median CPU ms per image of each process group of a server at one concurrency."""
    found = {g: median_of(result, server, concurrency, f"cpu:{g}") for g in GROUPS}
    return {g: v for g, v in found.items() if v is not None}


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{g} {cpu[g]:.1f}" for g in GROUPS if g in cpu)


def server_cpu_ms(result: dict, server: str, concurrency: int) -> float | None:
    """Median over rounds of a server's own CPU ms per image (every group but the client)."""
    return median_of(result, server, concurrency, "server_cpu")


def peer_stage(result: dict, server: str, peer: str, concurrency: int, cores: int) -> str:
    """CPU ms per image of each process group of a server and a peer, and what it allows."""
    return (f"CPU ms/image {server} {_cpu_text(_cpu(result, server, concurrency))}; "
            f"{peer} {_cpu_text(_cpu(result, peer, concurrency))}"
            f"{ceiling_text(result, (server, peer), concurrency, cores)}")  # fmt: skip


def ceiling_text(result: dict, servers: tuple[str, str], concurrency: int, cores: int) -> str:
    """Server CPU per image of two servers and the images/s it would allow on `cores` cores
    with nothing else running: the comparison a busy shared machine does not blur."""
    cpu = {s: server_cpu_ms(result, s, concurrency) for s in servers}
    if any(v is None for v in cpu.values()):
        return ""
    a, b = servers
    return (f"; server CPU ms/image {a} {cpu[a]:.1f} vs {b} {cpu[b]:.1f}: on {cores} cores alone at most "
            f"{1000 * cores / cpu[a]:.1f} vs {1000 * cores / cpu[b]:.1f} images/s")  # fmt: skip


def own_batch1_ms(result: dict, number: int, step: int, server: str = "imgcls") -> float | None:
    """The model's own batch-1 p50 in process, with the engine `server` computes with, just
    before `server`'s level at one round and step (bench.serve_bench's `model` rows), else
    the in-process figure of that engine taken before the rounds."""
    used = engine(result, server)
    rows = [r for r in rows_of(result, model_name(used), step) if r["round"] == number]
    row = next((r for r in rows if r.get("before") == server), rows[0] if rows else None)
    if row is None:
        row = in_process(result, 1, engine_method(used))
    return None if row is None else row["p50_ms"]


def own_median_ms(result: dict, server: str) -> float | None:
    """The median over rounds of the model's own batch-1 p50 taken just before `server`'s levels."""
    values = [r["p50_ms"] for r in result["rounds"] if r.get("before") == server and r["p50_ms"] is not None]
    return statistics.median(values) if values else None


Check = tuple[bool | None, str]


def _check(key: str, ok: bool, line: str, stage: Callable[[], str]) -> list[Check]:
    """A target's (passed, line), and when it failed, the stage line that explains it."""
    return [(ok, f"{key}: {line}")] + ([] if ok else [(None, f"{key}:   stage: {stage()}")])


def _service_times(result: dict, server: str, concurrency: int) -> str:
    """The service's own access-log times at one concurrency (medians over rounds)."""
    front = median_of(result, server, concurrency, "front_predict_ms_p50")
    model = median_of(result, server, concurrency, "model_classify_ms_p50")
    return f"{server} front /predict p50 {ms(front)} ms, model /classify p50 {ms(model)} ms"


def lone_target(key: str, result: dict, server: str = "imgcls") -> list[Check]:
    """c=1: the median over rounds of the service's p50 within MAX_ADDED_MS of the median
    of the model's own batch-1 p50 in process, each taken just before; when not, the stages
    of the median level."""
    lone = rows_of(result, server, concurrency=1)
    pairs = [(r, own_batch1_ms(result, r["round"], r["step"], server)) for r in lone]
    if not pairs or any(r["p50_ms"] is None or own is None for r, own in pairs):
        return [(False, f"{key}: c=1: no figures for the service or the model")] if lone else []
    served = statistics.median(r["p50_ms"] for r, _ in pairs)
    own = statistics.median(own for _, own in pairs)
    each = ", ".join(f"r{r['round']}s{r['step']} {r['p50_ms']:.1f}/{o:.1f}" for r, o in pairs)
    middle = sorted(pairs, key=lambda pair: pair[0]["p50_ms"])[(len(pairs) - 1) // 2]
    return _check(key, served - own <= MAX_ADDED_MS,
                  f"{server} c=1 p50 within {MAX_ADDED_MS:g} ms of the model's own batch-1 p50 "
                  f"({engine(result, server)}), medians over rounds: {served:.1f} vs {own:.1f} ms, "
                  f"{served - own:+.1f} ms (round r step s, service/model: {each})", lambda: lone_stages(*middle))  # fmt: skip


def lone_stages(row: dict, own_ms: float) -> str:
    """Where a lone request's time over the model's own goes: client and HTTP, the front
    (the upload's check, the call to the model process), the model process (decode, queue,
    batch)."""
    front, model = row.get("front_predict_ms_p50"), row.get("model_classify_ms_p50")
    if front is None:
        return f"client p50 {row['p50_ms']:.1f} ms (no access-log times)"
    head = f"round {row['round']} step {row['step']}: client+HTTP {row['p50_ms'] - front:+.1f} ms"
    # The forward pass timed in the serving process (imgcls_forward_seconds), else the
    # model's own in the bench process: its load, not the service, may slow it there.
    forward = row.get("forward_ms_mean")
    tail = (
        ""
        if forward is None
        else f" (forward pass in the server {forward:.1f} vs {own_ms:.1f} ms in process)"
    )
    forward = own_ms if forward is None else forward
    if model is None:  # one process: no /classify of its own in the access log
        return (
            f"{head}, server (decode, batch, answer) beyond the forward pass {front - forward:+.1f} ms{tail}"
        )
    return (f"{head}, front + call to the model {front - model:+.1f} ms, "
            f"model process beyond the forward pass {model - forward:+.1f} ms{tail}")  # fmt: skip


def throughput_targets(
    key: str, result: dict, concurrency: int, cores: int = 2, server: str = "imgcls"
) -> list[Check]:
    """At `concurrency`: the service's median images/s >= the best peer's and >=
    MIN_SHARE_OF_MODEL x its engine's own in process at batch 32 (Keras: predict_on_batch);
    stages when not."""
    mine = median_of(result, server, concurrency, "images_per_s")
    if mine is None:
        return []
    checks: list[Check] = []
    peers = {p: v for p in PEERS if (v := median_of(result, p, concurrency, "images_per_s")) is not None}
    if peers:
        best = max(peers, key=peers.get)
        checks += _check(key, mine >= peers[best], f"{server} c={concurrency} {mine:.1f} images/s >= best peer "
                         f"{best} {peers[best]:.1f} ({mine / peers[best]:.2f}x)",
                         lambda: peer_stage(result, server, best, concurrency, cores))  # fmt: skip
    method = engine_method(engine(result, server))
    if model := in_process(result, 32, method):
        rate = model["images_per_s"]
        checks += _check(key, mine >= MIN_SHARE_OF_MODEL * rate, f"{server} c={concurrency} {mine:.1f} images/s >= "
                         f"{MIN_SHARE_OF_MODEL:g}x in-process {method} at batch 32 {rate:.1f} ({mine / rate:.2f}x)",
                         lambda: model_stages(result, concurrency, model, server))  # fmt: skip
    return checks


def model_stages(result: dict, concurrency: int, model: dict, server: str = "imgcls") -> str:
    """CPU per image of each process group against the model's own in process, and the
    mean batch the service formed."""
    cpu = _cpu(result, server, concurrency)
    own = model.get("cpu_ms_per_image", {}).get("in-process")
    batch = median_of(result, server, concurrency, "mean_batch")
    parts = [f"CPU ms/image {_cpu_text(cpu)}"]
    if own is not None and "model" in cpu:
        parts.append(f"model process {cpu['model'] - own:+.1f} over in process ({own:.1f})")
    extra = sum(cpu.get(g, 0.0) for g in ("client", "front", "server"))
    parts.append(f"client+front+server {extra:.1f} share the cores with the model")
    if own is not None and "model" in cpu:
        # CPU-bound: the model's own ms per image over everything spent per answered image.
        ceiling = own / (cpu["model"] + extra)
        parts.append(f"with this CPU per image the cores allow at most {ceiling:.2f}x")
    if batch is not None:
        parts.append(f"mean batch {batch:.1f}")
    return "; ".join(parts)


def tail_target(key: str, result: dict, concurrency: int = 32, server: str = "imgcls") -> list[Check]:
    """p99 at `concurrency` (median across rounds) no worse than the best peer's."""
    mine = median_of(result, server, concurrency, "p99_ms")
    peers = {p: v for p in PEERS if (v := median_of(result, p, concurrency, "p99_ms")) is not None}
    if mine is None or not peers:
        return []
    best = min(peers, key=peers.get)
    batch = median_of(result, server, concurrency, "mean_batch")
    return _check(key, mine <= peers[best], f"{server} c={concurrency} p99 {mine:.1f} ms <= best peer {best} "
                  f"{peers[best]:.1f} ms", lambda: f"{_service_times(result, server, concurrency)}, mean batch {ms(batch)}")  # fmt: skip


def rate_target(key: str, result: dict, server: str, peer: str, concurrency: int, factor: float, cores: int = 2,
                note: str = "") -> list[Check]:  # fmt: skip
    """Median images/s of `server` at `concurrency` >= `factor` x `peer`'s; the stage when not."""
    mine = median_of(result, server, concurrency, "images_per_s")
    theirs = median_of(result, peer, concurrency, "images_per_s")
    if mine is None or theirs is None:
        return []
    return _check(key, mine >= factor * theirs, f"{server} ({engine(result, server)}) c={concurrency} {mine:.1f} "
                  f"images/s >= {factor:g}x {peer} ({engine(result, peer)}) {theirs:.1f} ({mine / theirs:.2f}x){note}",
                  lambda: peer_stage(result, server, peer, concurrency, cores))  # fmt: skip


def lone_speed_target(key: str, result: dict, server: str) -> list[Check]:
    """Median c=1 p50 of `server` <= F32_LONE_SHARE x LitServe's on Keras; the stage when not:
    the service's own times beside each model's own batch-1 p50."""
    mine, theirs = median_of(result, server, 1, "p50_ms"), median_of(result, KERAS_PEER, 1, "p50_ms")
    if mine is None or theirs is None:
        return []
    return _check(key, mine <= F32_LONE_SHARE * theirs, f"{server} ({engine(result, server)}) c=1 p50 {mine:.1f} ms "
                  f"<= {F32_LONE_SHARE:g}x {KERAS_PEER} ({engine(result, KERAS_PEER)}) {theirs:.1f} ms "
                  f"({mine / theirs:.2f}x)", lambda: f"{_service_times(result, server, 1)}, its model's own batch-1 p50 "
                  f"{ms(own_median_ms(result, server))} ms; {KERAS_PEER}'s model's own "
                  f"{ms(own_median_ms(result, KERAS_PEER))} ms")  # fmt: skip


def compiled_targets(key: str, result: dict, server: str, cores: int = 2) -> list[Check]:
    """Issue 20's targets of a service serving a compiled build (none for Keras): f32 against
    LitServe on Keras (c=32, c=128 images/s; c=1 p50) and on the same build (images/s);
    bf16 against LitServe on Keras at c=32."""
    used = engine(result, server)
    measured = {c for _, c in steps(result)}
    if used == "openvino-bf16":
        note = "" if key == "vgg16" else (
            f"; issue 20 sets the bf16 target on VGG16 with a trained head, here it is the {key} "
            "case's untrained model")  # fmt: skip
        return rate_target(key, result, server, KERAS_PEER, 32, BF16_SPEEDUP, cores, note)
    if used != "openvino-f32":
        return []
    checks: list[Check] = []
    for concurrency in (c for c in COMPILED_LEVELS if c in measured):
        checks += rate_target(key, result, server, KERAS_PEER, concurrency, F32_SPEEDUP, cores)
        checks += rate_target(key, result, server, COMPILED_PEER, concurrency, SHARE_OF_COMPILED_PEER, cores)
    return checks + lone_speed_target(key, result, server)


def targets(key: str, result: dict, cores: int = 2) -> list[Check]:
    """Issue 10's and issue 20's targets for one case as (passed, line), for each way of
    running the service that was measured (SERVICES); None marks a stage line that
    explains the failed target before it. Also: every request answered. `cores`: the
    machine's, for the CPU-bound ceilings of the stage lines."""
    checks: list[Check] = []
    measured = {r["server"] for r in result["rounds"]}
    for server in (s for s in SERVICES if s in measured):
        checks += lone_target(key, result, server)
        for concurrency in sorted({c for _, c in steps(result) if c > 1}):
            checks += throughput_targets(key, result, concurrency, cores, server)
        checks += tail_target(key, result, server=server)
        checks += compiled_targets(key, result, server, cores)
        failed = sum(r["errors"] for r in result["rounds"] if r["server"] == server)
        checks.append((not failed, f"{key}: {server} answers every request: {failed} failed"))
    return checks


def all_targets(results: dict, cores: int = 2) -> list[Check]:
    """`targets` of every case, in order."""
    return [check for key, result in results.items() for check in targets(key, result, cores)]


def with_targets(report: dict) -> dict:
    """The report with "targets" ({passed, check}) and "stages" (lines) filled in."""
    checks = all_targets(report["results"], report["machine"]["cores"])
    return report | {
        "targets": [{"passed": ok, "check": line} for ok, line in checks if ok is not None],
        "stages": [line for ok, line in checks if ok is None],
    }


def flags_line(machine: dict) -> str:
    """The CPU flags of FLAGS it has and lacks, and what OpenVINO reports it can compute in."""
    have = set(machine.get("cpu_flags", "").split())
    flags = ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in FLAGS)
    capabilities = " ".join(machine.get("openvino_capabilities") or ["-"])
    return f"CPU flags: {flags}; OpenVINO CPU capabilities: {capabilities}"


def runtime_lines(results: dict) -> list[str]:
    """What computes each server's answers, in which precision, and why (the services:
    their /metadata)."""
    return [f"{key}: {server} serves {runtime['name']} {runtime['precision']} ({runtime['reason']})"
            for key, result in results.items() for server, runtime in result.get("runtime", {}).items()]  # fmt: skip


def render(report: dict) -> str:
    """The whole printed report: machine, both tables, per-case notes, PASS/FAIL lines
    (a failed one followed by its stage)."""
    m, settings = report["machine"], report["settings"]
    parts = [
        "",
        flags_line(m),
        *runtime_lines(report["results"]),
        f"Images: {report['images']}. Rounds: {settings['rounds']} of concurrency "
        f"{', '.join(map(str, settings['levels']))} against each server in turn. mlflow: the client decodes "
        "and resizes each JPEG before timing and sends a JSON tensor (MLflow takes no image upload).\n",
        table(report["results"]),
        "\nWhere the time goes (medians across rounds; server times from the service's access log; CPU per",
        "answered image of the load generator, the HTTP fronts, the model process, the rest of the server):\n",
        breakdown(report["results"]),
        "",
    ]
    for key, result in report["results"].items():
        gaps = ", ".join(f"{name} {gap:.1e}" for name, gap in result["max_prob_gap"].items())
        parts.append(f"{key}: decode+resize p50 {result['preprocess_ms_p50']:.1f} ms; mlflow body "
                     f"{result['mlflow_body_kb']:.0f} KiB; max |p - p(a)|: {gaps}")  # fmt: skip
        for engine_name, q in result.get("test_split", {}).items():
            parts.append(f"{key}: test split ({q['images']} images) with {engine_name}: accuracy {q['accuracy']:.3f}, "
                         f"macro-F1 {q['macro_f1']:.3f}, top-1 agreement with Keras {q['agreement_with_keras']:.3f}")  # fmt: skip
    for ok, line in all_targets(report["results"], m["cores"]):
        parts.append(f"{'    ' if ok is None else 'PASS' if ok else 'FAIL'} {line}")
    parts.append(f"\n{report['seconds']:.0f} s in all")
    return "\n".join(parts)
