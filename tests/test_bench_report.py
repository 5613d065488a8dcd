"""bench.report on a results dict of bench.serve_bench's shape (in-process rows, rows of
rounds per server and step), and bench.loadgen's in-process loop / bench.sampling / bench.rounds
on tiny real work."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time

import pytest

from bench import loadgen, report, rounds, sampling

TABLE_HEADER = (
    "| case | server | step | concurrency | images/s min / med / max | p50 ms min / med / max "
    "| p99 ms min / med / max | errors |"
)
# Per server: (c=1 p50 ms, c=32 images/s, c=128 images/s, c=32 p99 ms), round 1; rounds 2
# and 3 add 1 and 2 to every figure.
FIGURES = {"imgcls": (42.0, 21.0, 22.0, 1600.0), "litserve": (45.0, 20.0, 20.5, 1700.0),
           "ray": (48.0, 19.0, 19.5, 1650.0)}  # fmt: skip
# Issue 20's servers (`compiled` below): the service and LitServe on the OpenVINO f32 build.
COMPILED_FIGURES = {"imgcls-f32": (25.0, 30.0, 31.0, 1000.0), "litserve-ov": (28.0, 29.0, 30.0, 1100.0)}
F32 = {
    "name": "openvino",
    "precision": "f32",
    "reason": "--precision f32; matched Keras on 200 parity images",
}
BF16 = {
    "name": "openvino",
    "precision": "bf16",
    "reason": "auto: the CPU reports BF16; matched Keras on 200 parity images",
}


def _row(server: str, number: int, step: int, concurrency: int) -> dict:
    lone, rate32, rate128, p99 = (x + number - 1 for x in (FIGURES | COMPILED_FIGURES)[server])
    rate = {1: 1000 / lone, 32: rate32, 128: rate128}[concurrency]
    row = {"server": server, "round": number, "step": step, "concurrency": concurrency, "requests": 24,
           "errors": 0, "capped": False, "images_per_s": rate, "p50_ms": lone if concurrency == 1 else 1500.0,
           "p99_ms": p99 if concurrency == 32 else 2 * lone,
           "cpu_ms_per_image": {"client": 2.0, "front": 3.0, "model": 90.0 + number, "server": 0.1}}  # fmt: skip
    if server.startswith("imgcls"):
        row |= {"front_predict_ms_p50": row["p50_ms"] - 1.5, "model_classify_ms_p50": row["p50_ms"] - 3.0,
                "mean_batch": 1.0 if concurrency == 1 else 30.0}  # fmt: skip
    return row


@pytest.fixture
def result() -> dict:
    a = [{"method": m, "batch": b, "images_per_s": ips, "p50_ms": p50, "p99_ms": p50 + 1,
          "cpu_ms_per_image": {"in-process": 88.0}}
         for m, b, ips, p50 in (("predict", 1, 20.0, 50.0), ("predict_on_batch", 1, 25.0, 40.0),
                                ("predict_on_batch", 32, 22.0, 1450.0))]  # fmt: skip
    rows = [
        _row(s, n, step, c)
        for n in (1, 2, 3)
        for s in FIGURES
        for step, c in enumerate(rounds.ROUND_LEVELS, 1)
    ]
    # The model's own batch-1 p50 in process just before each c=1 level of the service: 40 ms.
    rows += [{"server": "model", "before": "imgcls", "round": n, "step": step, "concurrency": 1, "requests": 24,
              "errors": 0, "images_per_s": 25.0, "p50_ms": 40.0, "p99_ms": 41.0}
             for n in (1, 2, 3) for step in (1, 3, 5)]  # fmt: skip
    return {
        "a": a,
        "rounds": rows,
        "max_prob_gap": {"imgcls": 1e-7},
        "preprocess_ms_p50": 1.2,
        "mlflow_body_kb": 1600,
    }


def _model_rows(name: str, before: str, p50: float) -> list[dict]:
    """The model's own batch-1 rows in process just before each c=1 level of `before`."""
    return [{"server": name, "before": before, "round": n, "step": step, "concurrency": 1, "requests": 24,
             "errors": 0, "images_per_s": 1000 / p50, "p50_ms": p50, "p99_ms": p50 + 1}
            for n in (1, 2, 3) for step in (1, 3, 5)]  # fmt: skip


@pytest.fixture
def compiled(result) -> dict:
    """`result` with issue 20's servers: imgcls-f32 and litserve-ov (both the f32 build, the
    model's own f32 batch-1 p50 23 ms before each c=1 level) and what each computes with."""
    result["a"] += [{"method": "openvino-f32", "batch": b, "images_per_s": ips, "p50_ms": p50, "p99_ms": p50 + 1,
                     "cpu_ms_per_image": {"in-process": 60.0}} for b, ips, p50 in ((1, 43.0, 23.0), (32, 32.0, 1000.0))]  # fmt: skip
    result["rounds"] += [_row(s, n, step, c) for n in (1, 2, 3) for s in COMPILED_FIGURES
                         for step, c in enumerate(rounds.ROUND_LEVELS, 1)]  # fmt: skip
    result["rounds"] += _model_rows("model openvino-f32", "imgcls-f32", 23.0)
    result["rounds"] += _model_rows("model openvino-f32", "litserve-ov", 24.0) + _model_rows(
        "model", "litserve", 40.0
    )
    result["runtime"] = {"imgcls-f32": F32, "litserve-ov": F32 | {"reason": "the peer's OpenVINO build"},
                         "litserve": {"name": "keras", "precision": "f32", "reason": "the peer"}}  # fmt: skip
    return result


def test_table_has_min_median_max_across_rounds_per_level(result):
    lines = report.table({"resnet50": result}).splitlines()
    assert lines[0] == TABLE_HEADER
    assert len(lines) == 2 + 3 + 3 * 5 + 3  # header, 3 in-process rows, 3 servers x 5 steps, the model at c=1
    assert "| resnet50 | in process predict_on_batch | - | batch 32 | 22.0 | 1450.0 | 1451.0 | 0 |" in lines
    assert (
        "| resnet50 | imgcls | 2 | 32 | 21.0 / 22.0 / 23.0 | 1500.0 / 1500.0 / 1500.0 | 1600.0 / 1601.0 / 1602.0 | 0 |"
        in lines
    )
    assert (
        "| resnet50 | ray | 3 | 1 | 20.0 / 20.4 / 20.8 | 48.0 / 49.0 / 50.0 | 96.0 / 98.0 / 100.0 | 0 |"
        in lines
    )


def test_breakdown_shows_the_service_stages_and_cpu_per_process(result):
    lines = report.breakdown({"resnet50": result}).splitlines()
    assert lines[0].endswith(
        "| forward pass mean ms | mean batch | CPU ms/image: client / front / model / server |"
    )
    assert "| resnet50 | imgcls | 1 | 1 | 43.0 | 41.5 | 40.0 | - | 1.0 | 2.0 / 3.0 / 92.0 / 0.1 |" in lines
    assert "| resnet50 | litserve | 4 | 128 | 1500.0 | - | - | - | - | 2.0 / 3.0 / 92.0 / 0.1 |" in lines


def test_lone_target_compares_medians_over_rounds_and_names_the_stages(result):
    checks = report.targets("resnet50", result)
    assert [ok for ok, _ in checks] == [True] * 7
    result["rounds"][0]["p50_ms"] = 60.0  # round 1, step 1: one slow level, the median holds
    assert report.targets("resnet50", result)[0][0]
    for row in result["rounds"]:  # 4.5 ms more in the model process at every c=1 level
        if row["server"] == "imgcls" and row["concurrency"] == 1:
            for k in ("p50_ms", "front_predict_ms_p50", "model_classify_ms_p50"):
                row[k] += 4.5
            row["forward_ms_mean"] = 39.0
    ok, line = report.targets("resnet50", result)[0]
    assert not ok and "medians over rounds: 47.5 vs 40.0 ms, +7.5 ms" in line
    assert "r1s1 64.5/40.0, r1s3 46.5/40.0" in line
    ok, stage = report.targets("resnet50", result)[1]
    assert ok is None and stage == (
        "resnet50:   stage: round 2 step 5: client+HTTP +1.5 ms, front + call to the model +1.5 ms, "
        "model process beyond the forward pass +5.5 ms (forward pass in the server 39.0 vs 40.0 ms in process)"
    )


def test_each_way_of_serving_gets_its_own_targets(result):
    """`imgcls-1p` (one process): its own target lines after the default's; its lone stage
    has no model process of its own to split off."""
    one = [r | {"server": "imgcls-1p"} for r in result["rounds"] if r["server"] == "imgcls"]
    for row in one:
        row.pop("model_classify_ms_p50")
        if row["round"] > 1 and row["concurrency"] == 1:  # 5 ms more in the server
            row["p50_ms"] += 5.0
            row["front_predict_ms_p50"] += 5.0
    before = [r | {"before": "imgcls-1p"} for r in result["rounds"] if r.get("before") == "imgcls"]
    result["rounds"] += one + before
    checks = report.targets("resnet50", result)
    lines = [line for ok, line in checks if ok is not None]
    assert (
        len(lines) == 14
        and [line.split(":")[1].split()[0] for line in lines] == ["imgcls"] * 7 + ["imgcls-1p"] * 7
    )
    (ok, lone), (_, stage) = checks[7], checks[8]
    assert (
        not ok
        and lone.startswith("resnet50: imgcls-1p c=1 p50 within 5 ms")
        and "48.0 vs 40.0 ms, +8.0" in lone
    )
    assert stage == (
        "resnet50:   stage: round 2 step 3: client+HTTP +1.5 ms, "
        "server (decode, batch, answer) beyond the forward pass +6.5 ms"
    )


def test_throughput_and_tail_targets_fail_against_a_faster_peer(result):
    for row in result["rounds"]:
        if row["server"] == "litserve" and row["concurrency"] == 32:
            row |= {"images_per_s": 30.0, "p99_ms": 900.0}
    checks = report.targets("resnet50", result)
    lines = [line for _, line in checks]
    assert "resnet50: imgcls c=32 22.0 images/s >= best peer litserve 30.0 (0.73x)" in lines
    assert "resnet50: imgcls c=32 p99 1601.0 ms <= best peer litserve 900.0 ms" in lines
    assert sum(ok is False for ok, _ in checks) == 2
    stage = lines[lines.index("resnet50: imgcls c=32 22.0 images/s >= best peer litserve 30.0 (0.73x)") + 1]
    assert stage.startswith("resnet50:   stage: CPU ms/image imgcls client 2.0, front 3.0, model 92.0")
    # Server CPU per image (all but the client): 95.1 ms each, so on 2 cores at most 21.0 images/s.
    assert stage.endswith(
        "; server CPU ms/image imgcls 95.1 vs litserve 95.1: on 2 cores alone at most 21.0 vs 21.0 images/s"
    )


def test_below_the_models_own_throughput_names_the_processes(result):
    result["a"][2]["images_per_s"] = 40.0
    lines = [line for _, line in report.targets("resnet50", result)]
    i = lines.index(
        "resnet50: imgcls c=128 23.0 images/s >= 0.95x in-process predict_on_batch at batch 32 40.0 (0.57x)"
    )
    assert lines[i + 1] == (
        "resnet50:   stage: CPU ms/image client 2.0, front 3.0, model 92.0, server 0.1; model process +4.0 "
        "over in process (88.0); client+front+server 5.1 share the cores with the model; with this CPU "
        "per image the cores allow at most 0.91x; mean batch 30.0"
    )


def test_with_targets_and_render(result):
    full = report.with_targets({
        "machine": {"cpu": "x", "cores": 2, "keras": "3", "mlflow": "3", "bentoml": "1", "load_average_at_start": 1.0},
        "settings": {"rounds": 3, "levels": list(rounds.ROUND_LEVELS)}, "images": "32 JPEGs",
        "results": {"resnet50": copy.deepcopy(result)}, "seconds": 700.0, "load_average_at_end": 2.0,
    })  # fmt: skip
    assert all(t["passed"] for t in full["targets"]) and full["stages"] == []
    text = report.render(full)
    assert TABLE_HEADER in text
    assert "\nPASS resnet50: imgcls answers every request: 0 failed\n" in text
    assert text.endswith("700 s in all")


def test_run_rounds_alternates_servers_within_each_round():
    calls = []

    def sender(name):
        return lambda i: calls.append(name)

    targets = [rounds.Target(n, sender(n), lambda c: 2 * c) for n in ("a", "b")]
    reference = rounds.Target("ref", sender("ref"), lambda c: 2, only=frozenset({1}))
    rows = rounds.run_rounds(targets, rounds=2, levels=(1, 3), cap_s=10, reference=reference)
    assert [(r["round"], r["server"], r["step"], r["concurrency"], r.get("before")) for r in rows] == [
        (1, "ref", 1, 1, "a"), (1, "a", 1, 1, None), (1, "a", 2, 3, None),
        (1, "ref", 1, 1, "b"), (1, "b", 1, 1, None), (1, "b", 2, 3, None),
        (2, "ref", 1, 1, "a"), (2, "a", 1, 1, None), (2, "a", 2, 3, None),
        (2, "ref", 1, 1, "b"), (2, "b", 1, 1, None), (2, "b", 2, 3, None),
    ]  # fmt: skip
    assert len(calls) == 2 * 2 * (2 + 6 + 2) and all(r["requests"] == 2 * r["concurrency"] for r in rows)


def test_servers_that_can_be_held_are_stopped_while_another_is_measured():
    events = []

    def target(name, holdable):
        hold = (
            (lambda stopped: events.append(f"{'stop' if stopped else 'resume'} {name}")) if holdable else None
        )
        return rounds.Target(name, lambda i: events.append(f"request {name}"),
                             lambda c: 1, hold=hold)  # fmt: skip

    rounds.run_rounds([target("imgcls", False), target("litserve", True)], rounds=1, levels=(1,), cap_s=10)
    assert events == ["stop litserve", "request imgcls", "resume litserve", "request litserve"]


@pytest.mark.timing
def test_drive_records_every_request_and_stops_on_the_event():
    stop = threading.Event()

    def send(i: int) -> None:
        time.sleep(0.005)
        if i == 5:
            stop.set()
        if i % 4 == 3:
            raise ConnectionError("refused")

    records = loadgen.drive(send, concurrency=2, stop=stop).records
    assert 6 <= len(records) <= 8  # requests in flight when the event is set still finish
    assert [r.start for r in records] == sorted(r.start for r in records)
    failed = [r for r in records if not r.ok]
    assert failed[0].status is None and failed[0].error == "ConnectionError: refused"
    assert {r.status for r in records if r.ok} == {200}
    row = loadgen.summarize(records, seconds=1.0)
    assert (
        row["requests"] + row["errors"] == len(records) and row["first_error"] == "ConnectionError: refused"
    )


@pytest.mark.timing
def test_run_level_counts_and_caps():
    row = loadgen.run_level(lambda i: None, requests=20, concurrency=4, cap_s=10)
    assert (row["requests"], row["errors"], row["capped"], row["concurrency"]) == (20, 0, False, 4)
    slow = loadgen.run_level(lambda i: time.sleep(0.2), requests=100, concurrency=2, cap_s=0.3)
    assert slow["capped"] and slow["requests"] < 100
    assert loadgen.percentiles([1.0, 2.0, 3.0])["p50_ms"] == 2.0


@pytest.mark.timing
def test_tree_sampler_sees_a_child_process_memory(tmp_path):
    code = "import subprocess, sys, time; b = bytearray(64 << 20); subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.5)
        with sampling.TreeSampler(
            proc.pid, interval_s=0.05, classify=lambda p, root: "root" if p.pid == root else "child"
        ) as sampler:
            time.sleep(0.3)
        assert sampler.peak_rss_by_role["root"] > 64 << 20  # the 64 MiB buffer
        assert "child" in sampler.peak_rss_by_role
        assert sampler.peak_rss_bytes >= sampler.peak_rss_by_role["root"]
        assert len(sampler.samples) >= 3
        cpu = sampling.cpu_counter(proc.pid)()
        assert cpu["client"] > 0 and "server" in cpu  # the tree's root has the "server" role
    finally:
        proc.kill()
        proc.wait()


def test_each_server_is_compared_with_the_model_on_its_own_engine(compiled):
    assert [report.engine(compiled, s) for s in ("imgcls", "imgcls-f32", "litserve-ov", "ray")] == [
        "keras", "openvino-f32", "openvino-f32", "keras"]  # fmt: skip
    # The reference just before imgcls-f32's round 2 step 3 is the f32 build's own row, not Keras's.
    assert report.own_batch1_ms(compiled, 2, 3, "imgcls-f32") == 23.0
    assert report.own_batch1_ms(compiled, 2, 3, "imgcls") == 40.0
    # No row of its engine in the rounds: the in-process figure of that engine.
    compiled["rounds"] = [r for r in compiled["rounds"] if r["server"] != "model openvino-f32"]
    assert report.own_batch1_ms(compiled, 2, 3, "imgcls-f32") == 23.0
    compiled["a"] = [r for r in compiled["a"] if r["method"] != "openvino-f32"]
    assert report.own_batch1_ms(compiled, 2, 3, "imgcls-f32") is None


def test_the_f32_build_against_litserve_on_keras_and_on_the_same_build(compiled):
    checks = [(ok, line) for ok, line in report.targets("resnet50", compiled) if "imgcls-f32" in line]
    lines = [line for _, line in checks]
    assert all(ok for ok, _ in checks) and len(lines) == 12
    assert lines[0].startswith(
        "resnet50: imgcls-f32 c=1 p50 within 5 ms of the model's own batch-1 p50 (openvino-f32), "
        "medians over rounds: 26.0 vs 23.0 ms, +3.0 ms"
    )
    assert lines[0].endswith("r2s5 26.0/23.0, r3s1 27.0/23.0, r3s3 27.0/23.0, r3s5 27.0/23.0)")
    assert (
        "resnet50: imgcls-f32 c=32 31.0 images/s >= 0.95x in-process openvino-f32 at batch 32 32.0 (0.97x)"
        in lines
    )
    assert lines[-6:-1] == [
        "resnet50: imgcls-f32 (openvino-f32) c=32 31.0 images/s >= 1.3x litserve (keras) 21.0 (1.48x)",
        "resnet50: imgcls-f32 (openvino-f32) c=32 31.0 images/s >= 0.9x litserve-ov (openvino-f32) 30.0 (1.03x)",
        "resnet50: imgcls-f32 (openvino-f32) c=128 32.0 images/s >= 1.3x litserve (keras) 21.5 (1.49x)",
        "resnet50: imgcls-f32 (openvino-f32) c=128 32.0 images/s >= 0.9x litserve-ov (openvino-f32) 31.0 (1.03x)",
        "resnet50: imgcls-f32 (openvino-f32) c=1 p50 26.0 ms <= 0.6x litserve (keras) 46.0 ms (0.57x)",
    ]  # fmt: skip
    # The service on Keras gets issue 10's targets only.
    assert not [line for _, line in report.targets("resnet50", compiled) if "imgcls (keras)" in line]


def test_a_failed_compiled_target_names_the_stage(compiled):
    for row in compiled["rounds"]:
        if row["server"] == "imgcls-f32" and row["concurrency"] == 1:
            row["p50_ms"] += 10.0
            row["front_predict_ms_p50"] += 10.0
            row["model_classify_ms_p50"] += 10.0
        if row["server"] == "litserve-ov" and row["concurrency"] == 128:
            row["images_per_s"] = 40.0
    lines = [line for _, line in report.targets("resnet50", compiled)]
    failed = {line for ok, line in report.targets("resnet50", compiled) if ok is False}
    lone = "resnet50: imgcls-f32 (openvino-f32) c=1 p50 36.0 ms <= 0.6x litserve (keras) 46.0 ms (0.78x)"
    rate = "resnet50: imgcls-f32 (openvino-f32) c=128 32.0 images/s >= 0.9x litserve-ov (openvino-f32) 40.0 (0.80x)"
    assert {lone, rate} <= failed
    assert lines[lines.index(lone) + 1] == (
        "resnet50:   stage: imgcls-f32 front /predict p50 34.5 ms, model /classify p50 33.0 ms, its model's "
        "own batch-1 p50 23.0 ms; litserve's model's own 40.0 ms"
    )
    assert lines[lines.index(rate) + 1].startswith(
        "resnet50:   stage: CPU ms/image imgcls-f32 client 2.0, front 3.0, model 92.0, server 0.1; litserve-ov "
    )


def test_bf16_is_held_to_three_times_litserve_on_keras(compiled):
    compiled["runtime"]["imgcls"] = BF16
    for row in compiled["rounds"]:
        if row.get("before") == "imgcls":
            row["server"] = "model openvino-bf16"
    checks = report.targets("resnet50", compiled)
    (ok, line), (stage_ok, stage) = next(
        (checks[i], checks[i + 1]) for i, (_, text) in enumerate(checks) if "imgcls (openvino-bf16)" in text
    )
    assert not ok and line.startswith(
        "resnet50: imgcls (openvino-bf16) c=32 22.0 images/s >= 3x litserve (keras) 21.0 (1.05x); "
        "issue 20 sets the bf16 target on VGG16 with a trained head"
    )
    assert stage_ok is None and stage.startswith("resnet50:   stage: CPU ms/image imgcls ")
    assert next(text for _, text in checks).startswith(
        "resnet50: imgcls c=1 p50 within 5 ms of the model's own batch-1 p50 (openvino-bf16), medians over rounds"
    )
    for row in compiled["rounds"]:
        if row["server"] == "imgcls" and row["concurrency"] == 32:
            row["images_per_s"] = 64.0
    assert any(ok and "imgcls (openvino-bf16) c=32 64.0 images/s >= 3x" in text
               for ok, text in report.targets("resnet50", compiled))  # fmt: skip


def test_render_shows_the_cpu_flags_and_what_each_server_computes_with(compiled):
    machine = {"cpu": "AMD EPYC 9R14", "cores": 2, "keras": "3", "mlflow": "3", "bentoml": "1",
               "load_average_at_start": 1.0, "cpu_flags": "avx2 avx512f avx512_vnni avx512_bf16",
               "openvino_capabilities": ["FP32", "BF16", "INT8"]}  # fmt: skip
    full = report.with_targets({
        "machine": machine, "settings": {"rounds": 3, "levels": list(rounds.ROUND_LEVELS)}, "images": "32 JPEGs",
        "results": {"resnet50": compiled}, "seconds": 900.0, "load_average_at_end": 2.0,
    })  # fmt: skip
    text = report.render(full)
    assert (
        "\nCPU flags: avx2 yes, avx512f yes, avx512_bf16 yes, amx_bf16 no; OpenVINO CPU capabilities: FP32 BF16 INT8\n"
        in text
    )
    assert (
        "\nresnet50: imgcls-f32 serves openvino f32 (--precision f32; matched Keras on 200 parity images)\n"
        in text
    )
    assert (
        "| resnet50 | in process openvino-f32 | - | batch 32 | - | - | - | - | - | in process 60.0 |" in text
    )
    assert "| resnet50 | model openvino-f32 | 1 | 1 |" in text
    assert (
        "\nPASS resnet50: imgcls-f32 (openvino-f32) c=1 p50 26.0 ms <= 0.6x litserve (keras) 46.0 ms (0.57x)\n"
        in text
    )


def test_each_target_can_have_its_own_reference():
    """A mapping: each target's reference runs before its own levels; one without none."""
    targets = [rounds.Target(n, lambda i: None, lambda c: 1) for n in ("a", "b", "c")]
    refs = {name: rounds.Target(f"ref-{name}", lambda i: None, lambda c: 1, only=frozenset({1}))
            for name in ("a", "b")}  # fmt: skip
    rows = rounds.run_rounds(targets, rounds=1, levels=(1, 3), cap_s=10, reference=refs)
    assert [(r["server"], r["concurrency"], r.get("before")) for r in rows] == [
        ("ref-a", 1, "a"), ("a", 1, None), ("a", 3, None), ("ref-b", 1, "b"), ("b", 1, None), ("b", 3, None),
        ("c", 1, None), ("c", 3, None),
    ]  # fmt: skip
