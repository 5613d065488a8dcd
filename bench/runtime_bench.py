"""Which compiled runtime: Keras against OpenVINO and ONNX Runtime on the same model and inputs.

    python -m bench.runtime_bench [--backbone resnet50] [--image-size 224] [--out FILE]

One model (random weights + the product's dense head, `training.model.build_model`), the
same uint8 inputs for every runtime, median latency of repeated calls at batch 1 and
images/s at batch 32, and each runtime's largest probability difference from Keras and its
top-1 agreement. OpenVINO runs in f32 and, where the CPU reports BF16 among its
optimisation capabilities, in bf16, compiled with the service's own settings
(service/compiled.py `config`). Also: OpenVINO's import, export and compile times (cold and
from its blob cache), the first call of each new batch size against later ones and against
padding to a power of two, and its batch-1 latency right after a Keras call (TensorFlow
stays in the model process for /explain). Prints the CPU model and flags. Issue 20 chose
the served runtime from these figures (docs/benchmarks.md). `make bench-runtime`.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from bench import harness
from service.compiled import config, export_build, openvino


def median_ms(call, x, repeats: int) -> float:
    """Median ms of `call(x)` over `repeats` calls, after two untimed ones."""
    return harness.timed(lambda _: call(x), repeats).median_ms


def batch_shapes(call, x, repeats: int) -> list[dict]:
    """ms of a new batch size's first call and of later ones, dynamic and padded to 2^k."""
    rows = []
    for batch in (3, 5, 12, 17, 25):
        start = time.perf_counter()
        call(x[:batch])
        first = time.perf_counter() - start
        padded = 1 << (batch - 1).bit_length()
        rows.append({"batch": batch, "first_ms": 1000 * first, "padded_to": padded,
                     "steady_ms": median_ms(call, x[:batch], max(3, repeats // 3)),
                     "padded_ms": median_ms(call, x[:padded], max(3, repeats // 3))})  # fmt: skip
    return rows


def interleaved(keras_call, call, x, repeats: int) -> float:
    """Median ms of `call(x)` each right after a `keras_call(x)`: do TensorFlow's threads,
    still spinning after their work, slow the compiled model sharing the cores?"""
    times = []
    for _ in range(repeats):
        keras_call(x)
        times += harness.timed(lambda _: call(x), 1, warm=0).ms
    return statistics.median(times)


def runtimes(model, work: Path, seconds: dict) -> dict:
    """name -> predict(batch) for every runtime that loads here; `seconds` gets OpenVINO's
    import, export and compile times (cold, then from its blob cache, as a restart loads)."""
    import numpy as np

    calls = {"keras": lambda x: np.asarray(model.predict_on_batch(x))}
    start = time.perf_counter()
    core = openvino().Core()
    seconds["openvino import + Core"] = time.perf_counter() - start
    start = time.perf_counter()
    xml = str(export_build(model, work))
    seconds["export to IR"] = time.perf_counter() - start
    precisions = ["f32"] + (
        ["bf16"] if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else []
    )
    threads = len(os.sched_getaffinity(0))
    for precision in precisions:  # the service's own settings (LATENCY hint, every core)
        for when in ("cold", "cached"):
            start = time.perf_counter()
            compiled = core.compile_model(core.read_model(xml), "CPU", config(precision, work))
            seconds[f"compile {precision} ({when})"] = time.perf_counter() - start
        request = compiled.create_infer_request()
        calls[f"openvino-{precision}"] = lambda x, r=request: r.infer([x])[0].copy()
    try:
        import onnxruntime as ort

        onnx_file = str(work / "model.onnx")
        model.export(onnx_file, format="onnx", verbose=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        calls["onnxruntime-f32"] = lambda x: session.run(None, {name: x})[0]
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot convert is a row that says so
        print(f"onnxruntime: {type(exc).__name__}: {exc}"[:300])
    return calls


def measure(args, work: Path) -> dict:
    import numpy as np

    from bench.predict_bench import build_predictor

    model = build_predictor(args.backbone, args.image_size, work).model
    x32 = (
        np.random.default_rng(0)
        .integers(0, 256, (32, args.image_size, args.image_size, 3))
        .astype(np.float32)
    )
    seconds: dict[str, float] = {}
    calls = runtimes(model, work, seconds)
    reference = calls["keras"](x32)
    rows = []
    for name, call in calls.items():
        out = call(x32)
        rows.append({
            "runtime": name, "batch1_ms": median_ms(call, x32[:1], args.repeats),
            "batch32_images_per_s": 32_000 / median_ms(call, x32, max(3, args.repeats // 3)),
            "max_abs_prob_diff": float(np.abs(out - reference).max()),
            "top1_agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
        })  # fmt: skip
    shapes = batch_shapes(calls["openvino-f32"], x32, args.repeats)
    after_keras = interleaved(calls["keras"], calls["openvino-f32"], x32[:1], args.repeats)
    return {"machine": {"model": f"{args.backbone} at {args.image_size}"}, "rows": rows, "shapes": shapes,
            "openvino_f32_b1_after_keras_ms": after_keras, "load_seconds": seconds}  # fmt: skip


def render(results: dict) -> str:
    info, rows, keras_rate = results["machine"], results["rows"], results["rows"][0]["batch32_images_per_s"]
    runtimes_table = harness.table(
        ["runtime", "batch 1 (ms)", "batch 32 (img/s)", "vs Keras", "max abs prob diff", "top-1 agreement"],
        ([r["runtime"], f"{r['batch1_ms']:.1f}", f"{r['batch32_images_per_s']:.1f}",
          f"{r['batch32_images_per_s'] / keras_rate:.2f}x", f"{r['max_abs_prob_diff']:.1e}", f"{r['top1_agreement']:.3f}"]
         for r in rows),
    )  # fmt: skip
    shapes = harness.table(["batch", "first call (ms)", "steady (ms)", "padded to", "padded steady (ms)"],
                           ([r["batch"], f"{r['first_ms']:.1f}", f"{r['steady_ms']:.1f}", r["padded_to"],
                             f"{r['padded_ms']:.1f}"] for r in results["shapes"]))  # fmt: skip
    return "\n".join([
        f"\n{info['model']}\n", runtimes_table,
        "\nopenvino-f32 on the batch sizes the batcher forms: a new shape's first call, then steady, "
        "against padding to the next power of two (what the JAX path does)\n", shapes,
        f"\nopenvino-f32 batch 1 right after a Keras call (TensorFlow's threads just busy): "
        f"{results['openvino_f32_b1_after_keras_ms']:.1f} ms, alone {rows[1]['batch1_ms']:.1f} ms",
        "\nOpenVINO load times: " + ", ".join(f"{k} {v:.2f} s" for k, v in results["load_seconds"].items()),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, "runtime_bench.json", shared=False, logs=False)
    p.add_argument("--backbone", default="resnet50", help="the model's backbone (resnet50)")
    p.add_argument("--image-size", type=int, default=224, help="its input size (224)")
    p.add_argument("--repeats", type=int, default=15, help="timed calls at batch 1 (15; a third at batch 32)")
    args = p.parse_args(argv)
    harness.run("runtime-bench", args, lambda work, _stop: measure(args, work), render)


if __name__ == "__main__":
    main()
