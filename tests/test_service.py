"""The real service: `bentoml serve`, real HTTP, real image files, a real browser; every test
runs against both ways of serving: two front processes beside a model process (the default)
and one process holding the model (`--one-process`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from imgcls.images import load_image
from imgcls.processes import QUIET_ENV, ServerProcess, descendants, free_port
from service.cli import serve_command, settings_env
from tests.browser import Chromium
from tests.service_fixtures import (
    CLASSES,
    SIZE,
    animated_gif,
    bomb_png,
    cmyk_jpeg,
    colour_image,
    copy_store,
    encode,
    exif_rotated_jpeg,
    palette_png_with_transparency,
    png16,
    save_tiny_model,
    service_env,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD = 1_000_000
MAX_PIXELS = 1_000_000
MAX_BATCH_IMAGES = 4
SERVER_HOLD: dict[str, Path] = {}  # base URL -> the file that holds its model calls


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module", params=["two-processes", "one-process"])
def server(request, tmp_path_factory, tiny_store) -> str:
    """A real server on the tiny model (BentoML store, registry version 7); its base URL.

    Two front processes and a model process: every test below also holds whichever front
    answers. One process: the front holds the model, no model process starts.
    """
    one_process = request.param == "one-process"
    home = copy_store(tiny_store, tmp_path_factory.mktemp("bentoml_home"))
    env = service_env(
        home,
        max_upload_bytes=MAX_UPLOAD,
        max_pixels=MAX_PIXELS,
        max_batch_images=MAX_BATCH_IMAGES,
        front_workers=1 if one_process else 2,
        one_process=one_process,
        # Room for the concurrency test's 16 requests even on an overloaded machine.
        max_concurrent_decodes=32,
        decode_wait_s=30,
        front_upload_memory_mib=1,  # two of the biggest uploads at once: the second is refused
    )
    env["IMGCLS_HOOK_MODEL_CALL"] = f"hold:{home / 'hold-model'}"  # see test_concurrent_...
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    with ServerProcess(
        serve_command("127.0.0.1", port), f"http://127.0.0.1:{port}/readyz", home / "server.log",
        env=env, cwd=root, port=port, timeout_s=150,
    ) as srv:  # fmt: skip
        SERVER_HOLD[srv.url] = home / "hold-model"
        workers = [" ".join(p.cmdline()) for p in descendants(srv.pid)]
        models = [w for w in workers if "_bentoml_impl.worker" in w and "imgcls-model" in w]
        assert len(models) == (0 if one_process else 1), workers
        yield srv.url


@pytest.fixture(scope="module")
def tiny_model(model_file):
    import keras

    return keras.saving.load_model(model_file, safe_mode=True)


def predict(url: str, data: bytes, name: str = "x.png", field: str = "image", **form) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={field: (name, data)}, data=form, timeout=30)


def assert_still_serving(url: str) -> None:
    response = predict(url, encode(colour_image("green"), "PNG"))
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "green"


def test_probes_and_metadata(server):
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200
    meta = httpx.get(f"{server}/metadata").json()
    assert meta["class_names"] == CLASSES and meta["version"] == "7"
    assert meta["image_size"] == list(SIZE) and meta["backbone"] == "tiny-cnn"
    assert meta["metrics"] == {"val_accuracy": 1.0} and meta["model"] == "image-classifier"


@pytest.mark.parametrize(
    ("data", "name", "label"),
    [
        (encode(colour_image("red"), "PNG"), "red.png", "red"),
        (encode(colour_image("blue"), "JPEG", quality=95), "blue.jpg", "blue"),
        (cmyk_jpeg("green"), "cmyk.jpg", "green"),
        (png16(colour_image("blue").astype(np.uint16) * 257), "deep.png", "blue"),
        (palette_png_with_transparency("red"), "palette.png", "red"),
        (animated_gif("green", "red"), "anim.gif", "green"),
        (exif_rotated_jpeg(colour_image("red", size=(30, 50))), "rotated.jpg", "red"),
    ],
    ids=["png", "jpeg", "cmyk", "16-bit", "palette-transparency", "animated-gif", "exif"],
)
def test_predict_labels_real_files(server, data, name, label):
    response = predict(server, data, name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "image-classifier" and body["version"] == "7"
    assert [p["label"] for p in body["predictions"]][0] == label
    assert len(body["predictions"]) == 3
    assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1, abs=1e-5)


def test_greyscale_and_top_k(server):
    grey = encode(np.full((20, 30), 128, np.uint8), "PNG")
    response = predict(server, grey, top_k="1")
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_http_probabilities_equal_the_model_in_memory(server, tiny_model, fmt):
    """Train/serve parity: same file, same probabilities, at a size that needs resizing."""
    data = encode(colour_image("green", size=(45, 61), seed=5), fmt)
    body = predict(server, data, f"x.{fmt.lower()}", top_k="3").json()
    served = {p["label"]: p["probability"] for p in body["predictions"]}
    expected = tiny_model.predict(load_image(data, SIZE)[None], verbose=0)[0]
    np.testing.assert_allclose([served[c] for c in CLASSES], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("files", "status", "reason"),
    [
        ({"image": ("notes.txt", b"not an image, just text")}, 400, "not an image"),
        ({"image": ("empty.png", b"")}, 400, "empty upload"),
        ({"image": ("cut.jpg", encode(colour_image("red"), "JPEG")[:300])}, 400, "truncated"),
        ({"image": ("cut.png", encode(colour_image("red"), "PNG")[:150])}, 400, "truncated"),
        ({"picture": ("red.png", encode(colour_image("red"), "PNG"))}, 400, "field 'image'"),
        ({"image": ("bomb.png", bomb_png(1500, 1500))}, 400, "over the limit of 1000000"),
        ({"image": ("huge.bin", bytes(MAX_UPLOAD + 10))}, 413, "over the limit"),
        ({"image": ("x.ico", encode(colour_image("red"), "ICO"))}, 415, "image format ICO is not accepted"),
        ({"image": ("x.dds", encode(colour_image("red"), "DDS"))}, 415, "image format DDS is not accepted"),
        ({"image": ("x.eps", encode(colour_image("red"), "EPS"))}, 415, "image format EPS is not accepted"),
    ],
    ids=[
        "not-image",
        "empty",
        "truncated-jpeg",
        "truncated-png",
        "wrong-field",
        "bomb",
        "too-big",
        "ico",
        "dds",
        "eps",
    ],  # fmt: skip
)
def test_bad_input_gets_4xx_json_and_server_keeps_serving(server, files, status, reason):
    response = httpx.post(f"{server}/predict", files=files, timeout=30)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]
    assert_still_serving(server)


def test_predict_batch_in_order_and_bounded(server):
    files = [("images", (f"{c}.png", encode(colour_image(c), "PNG"))) for c in CLASSES]
    body = httpx.post(f"{server}/predict_batch", files=files, timeout=30).json()
    assert [r["predictions"][0]["label"] for r in body["results"]] == CLASSES
    assert body["version"] == "7"

    too_many = files * 2
    response = httpx.post(f"{server}/predict_batch", files=too_many, timeout=30)
    assert response.status_code == 400 and "too many images: 6" in response.json()["error"]

    one_bad = [files[0], ("images", ("bad.png", b"garbage"))]
    response = httpx.post(f"{server}/predict_batch", files=one_bad, timeout=30)
    assert response.status_code == 400 and "image 1 (bad.png)" in response.json()["error"]
    assert_still_serving(server)


def test_bentoml_clients_call_the_public_api(server, tmp_path):
    """What a BentoML user writes works: BentoML's own sync and async clients find
    /predict, /predict_batch and /explain, get the same answers, and our errors."""
    import asyncio

    import bentoml
    from bentoml.exceptions import BentoMLException

    files = {}
    for colour in ("red", "green"):
        files[colour] = tmp_path / f"{colour}.png"
        files[colour].write_bytes(encode(colour_image(colour), "PNG"))
    (tmp_path / "notes.txt").write_bytes(b"not an image")
    with bentoml.SyncHTTPClient(server) as client:
        assert {"predict", "predict_batch", "explain"} <= set(client.endpoints)
        answer = client.predict(image=files["red"])
        assert answer["predictions"][0]["label"] == "red" and answer["version"] == "7"
        assert len(client.predict(image=files["green"], top_k=2)["predictions"]) == 2
        batch = client.predict_batch(images=[files["red"], files["green"]])
        assert [r["predictions"][0]["label"] for r in batch["results"]] == ["red", "green"]
        overlay = client.explain(image=files["red"])
        assert Image.open(overlay).format == "PNG"
        with pytest.raises(BentoMLException, match="notes.txt.*not an image"):
            client.predict(image=tmp_path / "notes.txt")

    async def call_async() -> dict:
        async with bentoml.AsyncHTTPClient(server) as client:
            return await client.predict(image=files["green"])

    assert asyncio.run(call_async())["predictions"][0]["label"] == "green"
    documented = httpx.get(f"{server}/docs.json").json()["paths"]  # BentoML's /docs lists them
    assert {"/predict", "/predict_batch", "/explain"} <= set(documented)


def test_explain_returns_a_png_overlay(server):
    data = encode(colour_image("red"), "PNG")
    response = httpx.post(f"{server}/explain", files={"image": ("red.png", data)}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert overlay.shape == (48, 40, 3)
    assert not np.array_equal(overlay, colour_image("red"))  # the heat-map is drawn on it
    bad = httpx.post(f"{server}/explain", files={"image": ("x.gif", b"GIF89a")}, timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()


def test_concurrent_requests_are_batched_and_counted(server, tmp_path_factory):
    """16 requests reach the batcher while the model is held (the IMGCLS_HOOK_MODEL_CALL
    seam), so batching does not depend on timing: the first batch is held, the rest
    queue behind it and go together."""
    data = encode(colour_image("blue"), "PNG")
    hold = _hold_file(server)
    before = httpx.get(f"{server}/metrics").text
    hold.touch()
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(predict, server, data) for _ in range(16)]
            _wait_for_queued(server, 16, before)
            hold.unlink()
            responses = [f.result() for f in futures]
    finally:
        hold.unlink(missing_ok=True)
    assert all(r.json()["predictions"][0]["label"] == "blue" for r in responses)
    metrics = httpx.get(f"{server}/metrics").text
    # Counted once each, whichever front process answered.
    assert _blue_predictions(metrics) - _blue_predictions(before) == 16
    assert "imgcls_prediction_confidence_bucket" in metrics
    after, earlier = _adaptive_batch_sizes(metrics), _adaptive_batch_sizes(before)
    assert after["sum"] - earlier["sum"] == 16
    assert after["count"] - earlier["count"] == 2, (earlier, after)  # 1, then the 15 queued
    # Each batch is one forward pass, timed in the runtime.
    passes, passed = (_adaptive_batch_sizes(m, "imgcls_forward_seconds") for m in (metrics, before))
    assert passes["count"] - passed["count"] == 2 and passes["sum"] > passed["sum"]


def test_a_front_holds_at_most_its_upload_budget(server):
    """Big uploads held at the model (the IMGCLS_HOOK_MODEL_CALL seam) keep their bytes in
    their front; one that would take a front past its 1 MiB budget gets a 503 at once. Three
    uploads on at most two fronts: at least one is refused, and the others are answered."""
    noise = np.random.default_rng(0).integers(0, 256, (560, 560, 3), dtype=np.uint8)
    big = encode(noise, "PNG")
    assert 0.5 * 2**20 < len(big) <= MAX_UPLOAD
    hold, before = _hold_file(server), httpx.get(f"{server}/metrics").text
    hold.touch()
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(predict, server, big) for _ in range(3)]
            deadline = time.monotonic() + 60
            while sum(f.done() for f in futures) + _images_at_model(server, before) < 3:
                assert time.monotonic() < deadline, "the uploads neither reached the model nor were refused"
                time.sleep(0.05)
            hold.unlink()
            responses = [f.result() for f in futures]
    finally:
        hold.unlink(missing_ok=True)
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.headers["retry-after"] == "1" for r in refused)
    assert all("MiB of uploads already" in r.json()["error"] for r in refused)
    assert all(r.status_code == 200 for r in responses if r not in refused), [r.text for r in responses]


def _hold_file(url: str) -> Path:
    """The hold file the server fixture named in IMGCLS_HOOK_MODEL_CALL."""
    return SERVER_HOLD[url]


def _wait_for_queued(url: str, n: int, before: str, timeout_s: float = 60) -> None:
    """Until `n` images reached the model's batcher since the `before` metrics: those of
    the held batch (counted in imgcls_batch_size when it started) and those waiting
    behind it (imgcls_batch_queued_images)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _images_at_model(url, before) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{n} images never reached the model's batcher")


def _images_at_model(url: str, before: str) -> float:
    """Images that reached the model's batcher since the `before` metrics: in batches
    (imgcls_batch_size) or waiting (imgcls_batch_queued_images)."""
    metrics = httpx.get(f"{url}/metrics").text
    queued = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("imgcls_batch_queued_images")
    )
    return _adaptive_batch_sizes(metrics)["sum"] - _adaptive_batch_sizes(before)["sum"] + queued


def _blue_predictions(metrics: str) -> float:
    """imgcls_predictions_total{label="blue"}, summed over the lines /metrics gives."""
    lines = [line for line in metrics.splitlines() if line.startswith("imgcls_predictions_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'label="blue"' in line)


def _adaptive_batch_sizes(metrics: str, name: str = "imgcls_batch_size") -> dict[str, float]:
    """Sum and count of a histogram: by default the model batcher's batch sizes."""
    totals = {"sum": 0.0, "count": 0.0}
    for line in metrics.splitlines():
        for key in totals:
            if line.startswith(f"{name}_{key}"):
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


@pytest.mark.browser
def test_page_shows_the_label_of_an_uploaded_file(server, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(encode(colour_image("red"), "PNG"))
    with Chromium(tmp_path / "profile") as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=f"{server}/")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        page.upload(image)
        assert page.evaluate("document.getElementById('top-label').textContent") == "red"
        assert page.evaluate("document.querySelectorAll('#bars .bar').length") == 3
        page.wait_for("document.getElementById('overlay').naturalWidth > 0")


def test_one_process_is_an_option_and_refuses_model_workers(monkeypatch, capsys):
    from imgcls.cli import build_parser

    args = build_parser().parse_args(["serve", "--one-process"])
    assert settings_env(args)["IMGCLS_SERVE_ONE_PROCESS"] == "true"
    assert "IMGCLS_SERVE_ONE_PROCESS" not in settings_env(build_parser().parse_args(["serve"]))
    monkeypatch.setenv("IMGCLS_SERVE_ONE_PROCESS", "true")
    # `serve` exports its options to os.environ: setenv first, so teardown removes them.
    monkeypatch.setenv("IMGCLS_SERVE_MODEL_WORKERS", "1")
    args = build_parser().parse_args(["serve", "--model-workers", "2"])
    assert args.func(args) == 2  # refused before any server starts
    out = capsys.readouterr().out
    assert "error: one_process holds the model in each front worker: use --front-workers" in out


# What a BentoML worker does before it builds its app (_bentoml_impl/worker/service.py:
# the service of its --service-name, then Service.to_asgi -> inject_config), then the
# exclusion list its OpenTelemetry middleware gets, asked of three URLs.
_WORKER_TRACING = """
import json, sys
import service.service as s
from bentoml._internal.configuration.containers import BentoMLContainer
svc = s.ImageClassifier if sys.argv[1] == "imgcls" else s.ImageClassifier.find_dependent_by_name(sys.argv[1])
svc.inject_config()
excluded = BentoMLContainer.tracing_excluded_urls.get()
urls = ["http://127.0.0.1:3000/classify", "http://127.0.0.1:3000/describe", "http://127.0.0.1:3000/predict"]
print(json.dumps([excluded.url_disabled(u) for u in urls]))
"""


@pytest.mark.parametrize(
    ("worker", "options", "untraced"),
    [
        ("imgcls-model", "", [True, True, False]),
        ("imgcls", "", [False, False, False]),  # the fronts' public routes stay traced
        (
            "imgcls-model",
            "services:\n  imgcls-model:\n    tracing:\n      excluded_urls: /describe\n",
            [False, True, False],
        ),
    ],
)
def test_the_model_process_leaves_its_internal_routes_untraced(worker, options, untraced, tmp_path):
    """A top-level `tracing.excluded_urls` option never reached the model process: each
    worker takes its own service's tracing settings. The model service declares its own;
    a user's `services.imgcls-model.tracing` in a BentoML config file still wins (a flat
    BENTOML_CONFIG_OPTIONS key cannot hold the service name's dash)."""
    env = {**os.environ, **QUIET_ENV}
    env.pop("BENTOML_CONFIG_OPTIONS", None)
    if options:
        (tmp_path / "bentoml.yaml").write_text(options)
        env["BENTOML_CONFIG"] = str(tmp_path / "bentoml.yaml")
    out = subprocess.run(
        [sys.executable, "-c", _WORKER_TRACING, worker],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == untraced
