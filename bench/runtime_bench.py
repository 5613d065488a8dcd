"""Which compiled runtime: Keras against OpenVINO and ONNX Runtime on the same model and inputs.

    python -m bench.runtime_bench [--backbone resnet50] [--image-size 224] [--out FILE]

One model (random weights + the product's dense head, `training.model.build_model`), the
same uint8 inputs for every runtime, median latency of repeated calls at batch 1 and
images/s at batch 32, and each runtime's largest probability difference from Keras and its
top-1 agreement. OpenVINO runs in f32 and, where the CPU reports BF16 among its
optimisation capabilities, in bf16. Prints the CPU model and flags. Issue 20 chose the
served runtime from these figures (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_flags, machine, quiet_environment  # noqa: E402


def timed(call, x, repeats: int) -> float:
    """Median seconds of `call(x)` over `repeats` calls, after two untimed ones."""
    call(x)
    call(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def runtimes(model, work: Path) -> dict:
    """name -> predict(batch) for every runtime that loads here."""
    import numpy as np

    calls = {"keras": lambda x: np.asarray(model.predict_on_batch(x))}
    import openvino as ov

    core = ov.Core()
    xml = str(work / "model.xml")
    model.export(xml, format="openvino", verbose=False)
    precisions = ["f32"] + (
        ["bf16"] if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else []
    )
    threads = os.cpu_count() or 1
    for precision in precisions:
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
                  "INFERENCE_NUM_THREADS": threads}  # fmt: skip
        compiled = core.compile_model(core.read_model(xml), "CPU", config)
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


def main(argv: list[str] | None = None) -> int:
    quiet_environment()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runtime_bench.json"))
    args = parser.parse_args(argv)
    import numpy as np

    from bench.predict_bench import build_predictor

    with tempfile.TemporaryDirectory(prefix="imgcls-runtime-") as tmp:
        model = build_predictor(args.backbone, args.image_size, Path(tmp)).model
        rng = np.random.default_rng(0)
        x32 = rng.integers(0, 256, (32, args.image_size, args.image_size, 3)).astype(np.float32)
        calls = runtimes(model, Path(tmp))
        reference = calls["keras"](x32)
        rows = []
        for name, call in calls.items():
            out = call(x32)
            batch1 = timed(call, x32[:1], args.repeats)
            batch32 = timed(call, x32, max(3, args.repeats // 3))
            rows.append({
                "runtime": name, "batch1_ms": 1000 * batch1, "batch32_images_per_s": 32 / batch32,
                "max_abs_prob_diff": float(np.abs(out - reference).max()),
                "top1_agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
            })  # fmt: skip
    keras_rate = rows[0]["batch32_images_per_s"]
    info = machine() | {"cpu_flags": cpu_flags(), "model": f"{args.backbone} at {args.image_size}"}
    print(f"\n{info['cpu']}, {info['cores']} cores; {info['model']}; flags: {info['cpu_flags']}\n")
    print("| runtime | batch 1 (ms) | batch 32 (img/s) | vs Keras | max abs prob diff | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['batch1_ms']:.1f} | {r['batch32_images_per_s']:.1f} | "
              f"{r['batch32_images_per_s'] / keras_rate:.2f}x | {r['max_abs_prob_diff']:.1e} | "
              f"{r['top1_agreement']:.3f} |")  # fmt: skip
    args.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
