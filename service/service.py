"""The champion behind a BentoML REST API: `bentoml serve service.service:ImageClassifier`.

Two services: `ImageClassifier` answers HTTP (decodes and checks uploads, formats
answers, serves the page) and `ClassifierModel` holds the model and runs adaptive
batching, so single-image requests that arrive together share one forward pass.
BentoML builds both from their decorators when it imports this module, so the settings
are read here, when the server starts; nothing else happens at import.
"""

import functools
import logging
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import FileResponse, Response

from imgcls.images import ImageDecodeError, decode_image, prepare_image
from service import gradcam
from service.limits import BodyLimitMiddleware, Rejected, install_error_handlers
from service.predictor import load_predictor, top_k
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)
SETTINGS = ServiceSettings()
# The public routes; FastAPI's own docs live under /api so BentoML's stay at /docs.
PAGE = FastAPI(title="imgcls", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
ImageField = Annotated[UploadFile, File(description="an image file (JPEG, PNG, GIF, ...)")]
TopK = Annotated[int | None, Form(ge=1, le=1000, description="labels per image")]
STATIC = Path(__file__).parent / "static"


def _classify_api(settings: ServiceSettings) -> Any:
    """`@bentoml.api` for the model call: adaptive batching unless turned off."""
    if not settings.batching:
        return bentoml.api()
    return bentoml.api(
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )


@bentoml.service(
    name="imgcls-model",
    traffic={"timeout": SETTINGS.timeout_s},
    # BentoML 1.4.40 recycles the front's client session every 100 requests / 300 s and
    # closes connections still in use (bentoml#5540, #5544): in-flight calls fail. Keep one.
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
    # No CPU resource on purpose: BentoML would cap the model's threads to it.
    **({"resources": {"gpu": 1}} if SETTINGS.gpu else {}),
)
class ClassifierModel:
    """The champion model, loaded and warmed up once per worker."""

    def __init__(self) -> None:
        self.predictor = load_predictor(SETTINGS)

    @_classify_api(SETTINGS)
    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Softmax probabilities for an (N, H, W, 3) batch of model inputs.

        The front sends uint8 pixels (exact: they are rounded already), a quarter of the
        bytes of float32 to pickle and copy between the processes.
        """
        return self.predictor.probabilities(batch)

    @bentoml.api
    def heatmap(self, image: np.ndarray) -> np.ndarray:
        """Grad-CAM (h, w) of one (H, W, 3) model input for its predicted class."""
        return self.predictor.heatmap(image)

    @bentoml.api
    def describe(self) -> dict:
        """Name, version and model card of the loaded champion."""
        return self.predictor.metadata()


@bentoml.service(name="imgcls", workers=SETTINGS.front_workers, traffic={"timeout": SETTINGS.timeout_s})
@bentoml.asgi_app(PAGE, path="/")
class ImageClassifier:
    """Public API: /predict, /predict_batch, /explain, /metadata and the page at /.

    FastAPI routes rather than `@bentoml.api` ones: they parse the upload themselves, so
    every client mistake (a wrong field name included) gets a 4xx with a JSON reason.
    """

    model = bentoml.depends(ClassifierModel)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self._meta: dict | None = None
        # Warm the resize path (it imports Keras and its backend, seconds on a cold
        # process) before /readyz says ready, not on the first client's request.
        prepare_image(np.zeros((4, 4, 3), dtype=np.uint8), (2, 2))

    def __is_ready__(self) -> bool:
        """Ready once the model process has loaded and warmed up the champion."""
        try:
            return bool(self.meta())
        except Exception:  # the model process is still starting
            return False

    def meta(self) -> dict:
        """The champion's metadata, asked once from the model process."""
        if self._meta is None:
            self._meta = self.model.describe()
        return self._meta

    @PAGE.post("/predict")
    def predict(self, image: ImageField, top_k: TopK = None) -> dict:
        """Top-k labels of one uploaded image (multipart field `image`)."""
        probs = self.model.classify(self._model_input(self._pixels(image))[None])[0]
        return self._answer([probs], top_k)[0]

    @PAGE.post("/predict_batch")
    def predict_batch(self, images: list[ImageField], top_k: TopK = None) -> dict:
        """Top-k labels of several images (repeated field `images`), one result each, in order."""
        limit = self.settings.max_batch_images
        if len(images) > limit:
            raise Rejected(400, f"too many images: {len(images)}, at most {limit}")
        batch = np.stack([self._model_input(self._pixels(u, f"image {i}")) for i, u in enumerate(images)])
        step = self.settings.max_batch_size
        probs = [self.model.classify(batch[i : i + step]) for i in range(0, len(batch), step)]
        results = self._answer(list(np.concatenate(probs)), top_k)
        return {**_origin(self.meta()), "results": [{"predictions": r["predictions"]} for r in results]}

    @PAGE.post("/explain", response_class=Response)
    def explain(self, image: ImageField) -> Response:
        """Grad-CAM overlay (PNG) of one uploaded image for its predicted class."""
        pixels = self._pixels(image)
        heat = self.model.heatmap(self._model_input(pixels).astype(np.float32))
        return Response(gradcam.overlay_png(pixels, heat), media_type="image/png")

    @PAGE.get("/metadata")
    def metadata(self) -> dict:
        """Classes, backbone, input size, version and the metrics it was promoted on."""
        return self.meta()

    @PAGE.get("/", response_class=FileResponse)
    def page(self) -> FileResponse:
        """The drop-an-image page."""
        return FileResponse(STATIC / "index.html")

    def _pixels(self, upload: UploadFile, what: str = "image") -> np.ndarray:
        """Decoded RGB pixels of an upload; 413 over the byte limit, 400 if unusable."""
        limit = self.settings.max_upload_bytes
        if upload.size is not None and upload.size > limit:
            raise Rejected(413, f"{what} is over the upload limit of {limit} bytes")
        try:
            return decode_image(upload.file.read(), max_pixels=self.settings.max_pixels)
        except ImageDecodeError as exc:
            raise Rejected(400, f"{what} ({upload.filename}): {exc}") from exc

    def _model_input(self, pixels: np.ndarray) -> np.ndarray:
        """The model's input as uint8 (H, W, 3): what `load_image` gives, before the cast."""
        return prepare_image(pixels, tuple(self.meta()["image_size"]))

    def _answer(self, rows: list[np.ndarray], k: int | None) -> list[dict]:
        """Response bodies for probability rows; counts them in /metrics."""
        meta, k = self.meta(), k or self.settings.top_k
        answers = []
        for row in rows:
            preds = top_k(row, meta["class_names"], k)
            _observe(preds[0])
            answers.append({**_origin(meta), "predictions": preds})
        return answers


def _origin(meta: dict) -> dict:
    return {"model": meta["model"], "version": meta["version"]}


@functools.cache
def _prediction_metrics() -> tuple[Any, Any]:
    """Counter of predictions per top-1 class and a histogram of top-1 confidence."""
    # Imported late: BentoML sets prometheus' multiprocess folder when a worker starts.
    import prometheus_client

    counter = prometheus_client.Counter("imgcls_predictions", "Predictions served, by top-1 label", ["label"])
    buckets = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
    histogram = prometheus_client.Histogram(
        "imgcls_prediction_confidence", "Top-1 probability of served predictions", buckets=buckets
    )
    return counter, histogram


def _observe(best: dict) -> None:
    counter, histogram = _prediction_metrics()
    counter.labels(label=best["label"]).inc()
    histogram.observe(best["probability"])


install_error_handlers(PAGE)
ImageClassifier.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_upload_bytes)
