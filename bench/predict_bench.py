"""Batch prediction (`imgcls predict`) against the model's own `predict_on_batch`.

    python -m bench.predict_bench [--quick] [--batch-size 32] [--out FILE]

For each model (the demo's simple_cnn at 32x32 on 32x32 PNGs; ResNet50 with random
weights on 640x480 JPEG photos, at 96x96 with --quick, else 224x224) it measures, with
Keras (`--runtime keras`) and then with the compiled build `imgcls predict` serves by
default (service/compiled.py, verified on 200 of the files as its parity set):
- the model alone: images/s on inputs already in memory (the limit);
- `imgcls predict`: images/s of `service.batch_predict.predict_files` end to end: read each
  file, decode and resize it (imgcls.images.model_input, on threads beside the model),
  batch, predict, write the CSV.
Prints a Markdown table (issue 20's target: the compiled command >= 1.3x the Keras one)
and writes JSON. Speed does not depend on weight values.
"""

from __future__ import annotations

from pathlib import Path

from bench import harness

CLASSES = [str(i) for i in range(10)]


def make_files(folder: Path, count: int, size: tuple[int, int], fmt: str) -> list[Path]:
    """`count` noisy images of `size` (height, width) as files; their paths."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        path = folder / f"{i:05d}.{fmt.lower().replace('jpeg', 'jpg')}"
        Image.fromarray(pixels).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def build_predictor(backbone: str, image_size: int, work: Path):
    """A Predictor on a freshly built model (random weights) with its card."""
    from bench.cases import untrained_model
    from imgcls.modelcard import ModelCard
    from service.predictor import Predictor

    card = ModelCard(class_names=CLASSES, image_size=(image_size, image_size), backbone=backbone)
    predictor = Predictor(untrained_model(backbone, image_size, len(CLASSES)), card, "bench")
    predictor.warm_up()
    return predictor


def model_rate(predictor, batch_size: int, images: int) -> float:
    """Images/s of the model alone (`Predictor.probabilities`: Keras's `predict_on_batch`
    or the compiled build) on in-memory float32 batches."""
    import numpy as np

    h, w = predictor.card.image_size
    batch = np.random.default_rng(1).uniform(0, 255, (batch_size, h, w, 3)).astype(np.float32)
    steps = max(1, images // batch_size)  # this batch size traced once first, not timed
    return steps * batch_size / harness.timed(lambda _: predictor.probabilities(batch), steps, warm=1).wall_s


def command_rate(predictor, files: list[Path], batch_size: int, out: Path) -> float:
    """Images/s of `imgcls predict`'s work (service.batch_predict.predict_files)."""
    from service.batch_predict import predict_files

    predict_files(predictor, files[:batch_size], out, batch_size=batch_size)  # warm the path
    summary = predict_files(predictor, files, out, batch_size=batch_size)
    assert summary.skipped == 0
    return summary.images / summary.seconds


def measure(name, backbone, image_size, file_size, fmt, count, batch_size, work: Path) -> list[dict]:
    """A row with Keras, then a row with the verified compiled build."""
    import numpy as np

    from imgcls.images import model_input
    from service.compiled import compile_verified

    predictor = build_predictor(backbone, image_size, work)
    files = make_files(work / name, count, file_size, fmt)
    parity = np.stack([model_input(f.read_bytes(), predictor.card.image_size) for f in files[:200]])
    rows = []
    for runtime in ("keras", "auto"):
        compile_verified(predictor, runtime, "auto", work / f"{name}-build", parity)
        limit = model_rate(predictor, batch_size, count)
        command = command_rate(predictor, files, batch_size, work / f"{name}.csv")
        rows.append({
            "model": name, "input": f"{image_size}x{image_size}", "files": f"{count} {fmt} {file_size[1]}x{file_size[0]}",
            "runtime": f"{predictor.runtime.name} {predictor.runtime.precision}", "reason": predictor.runtime.reason,
            "model_images_per_s": round(limit, 1), "imgcls_predict_images_per_s": round(command, 1),
            "ratio": round(command / limit, 3),
            "vs_keras": round(command / rows[0]["imgcls_predict_images_per_s"], 3) if rows else 1.0,
        })  # fmt: skip
    return rows


def render(results: dict) -> str:
    rows = ([r["model"], r["input"], r["files"], r["runtime"], f"{r['model_images_per_s']:,} img/s",
             f"{r['imgcls_predict_images_per_s']:,} img/s", f"{r['ratio']:.2f}x", f"{r['vs_keras']:.2f}x"]
            for r in results["results"])  # fmt: skip
    header = [
        "model",
        "input",
        "files",
        "runtime",
        "model alone",
        "`imgcls predict`",
        "of the model",
        "vs Keras",
    ]
    reasons = [f"{r['model']} {r['runtime']}: {r['reason']}" for r in results["results"]]
    return "\n".join([harness.table(header, rows), *reasons])


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, "predict_bench.json", shared=False, logs=False)
    p.add_argument("--quick", action="store_true", help="fewer files, ResNet50 at 96x96")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    args = p.parse_args(argv)
    size = 96 if args.quick else 224
    cases = [
        ("demo simple_cnn", "simple_cnn", 32, (32, 32), "PNG", 512 if args.quick else 2048),
        ("ResNet50", "resnet50", size, (480, 640), "JPEG", 128 if args.quick else 512),
    ]
    harness.run("predict-bench", args, lambda work, _stop: {
        "results": [row for case in cases for row in measure(*case, args.batch_size, work)]}, render)  # fmt: skip


if __name__ == "__main__":
    main()
