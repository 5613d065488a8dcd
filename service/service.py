"""The champion behind a BentoML REST API: `bentoml serve service.service:ImageClassifier`.

Two services: `ImageClassifier` answers HTTP (checks uploads and forwards their bytes,
formats answers, serves the page) and `ClassifierModel` holds the model, decodes each
upload once at its input size (service/replies.py) and batches the requests that arrive
while it is busy (service/batching.py), so they share one forward pass.
By default each runs in processes of its own; with `--one-process` the front holds the
model itself and no model process starts (service/link.py says when that pays).
BentoML builds both from their decorators when it imports this module, so the settings
are read here, when the server starts; nothing else happens at import.
"""

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from bentoml.validators import ContentType
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import FileResponse, Response

from imgcls.hooks import hook
from imgcls.images import ImageDecodeError
from imgcls.lifeline import die_with_parent
from imgcls.redact import redact_logs
from service import gradcam
from service.abstain import abstention, count_abstentions
from service.access import ApiKeyMiddleware
from service.batching import Batcher, Overloaded, Policy
from service.errors import ErrorShapeMiddleware
from service.limits import (
    BodyLimitMiddleware,
    Rejected,
    install_error_handlers,
    return_freed_memory_to_the_system,
)
from service.link import LocalLink, ModelLink, RemoteLink
from service.metrics import BatchMetrics, FollowerMetrics, observe_prediction
from service.predictor import configure_accelerator, keep_off_accelerators
from service.replies import Upload, classify_uploads, decode_uploads, error_reply, model_origin
from service.schema import PublicSchemaMiddleware
from service.settings import ServiceSettings
from service.shedding import (
    BACKSTOP_S,
    PREDICTING_WITHIN_S,
    DeadlineMiddleware,
    HeatmapLane,
    RouteLimitMiddleware,
    front_limits,
    heatmap_waiting_limit,
    model_max_concurrency,
)
from service.sources import build_follower
from service.uploads import Decoder, HeldUploads, read_upload, refuse

logger = logging.getLogger(__name__)
SETTINGS = ServiceSettings()
# The public routes; FastAPI's own docs live under /api so BentoML's stay at /docs.
PAGE = FastAPI(title="imgcls", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
ImageField = Annotated[UploadFile, File(description="an image file (JPEG, PNG, GIF, ...)")]
TopK = Annotated[int | None, Form(ge=1, le=1000, description="labels per image")]
STATIC = Path(__file__).parent / "static"
EXPLAINED = {"content": {"image/png": {}}, "description": "the Grad-CAM overlay, a PNG"}
# The model's replies, with their media type declared: BentoML 1.4.40 otherwise derives it
# from a JSON schema it builds anew for every answer (IOMixin.mime_type), which cost the
# model process ~3% of its CPU per image under load (py-spy, ResNet50 at concurrency 32).
Replies = Annotated[list[dict], ContentType("application/json")]
# The model process's routes are the internal hop from a front, not the public API, so
# they are left out of OpenTelemetry tracing (the fronts' public routes stay traced).
# Traced, BentoML's middleware there opened a span for the request and one for every chunk
# of every pickled reply: about a third of that process's Python time under load (py-spy
# --gil, ResNet50 at concurrency 32). BentoML 1.4.40 makes each worker's tracing settings
# its own service's (`services.<name>.tracing`, Service.inject_config): a top-level
# `tracing.excluded_urls` option never reaches the model process. A user's own
# `services: {imgcls-model: {tracing: ...}}` in a BentoML config file still wins.
INTERNAL_ROUTES = ["/classify", "/explain", "/describe"]


def _worker_started() -> None:
    """First thing in each server worker: exit with the arbiter, whose death would otherwise
    leave it serving (imgcls/lifeline.py), and keep credentials out of its logs."""
    die_with_parent()
    redact_logs(logging.getLogger("bentoml"))


def _batching_policy(settings: ServiceSettings) -> Policy:
    """Bounded-wait batching (service/batching.py); batches of one with --no-batching."""
    size = settings.max_batch_size if settings.batching else 1
    return Policy(size, settings.max_wait_ms / 1000, settings.max_latency_ms / 1000)


@bentoml.service(
    name="imgcls-model",
    workers=SETTINGS.model_workers,
    # A backstop: the fronts' own limits keep below it (service/shedding.py).
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": model_max_concurrency(SETTINGS)},
    # BentoML 1.4.40 recycles the front's client session every 100 requests / 300 s and
    # closes connections still in use (bentoml#5540, #5544): in-flight calls fail. Keep one.
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
    tracing={"excluded_urls": INTERNAL_ROUTES},
    # No CPU resource on purpose: BentoML would cap the model's threads to it.
    **({"resources": {"gpu": 1}} if SETTINGS.gpu else {}),
)
class ClassifierModel:
    """The champion, loaded and warmed up once per worker, and kept equal to the registry's."""

    def __init__(self) -> None:
        _worker_started()
        configure_accelerator()
        self.follower = build_follower(SETTINGS, FollowerMetrics())
        self.decoder = Decoder(SETTINGS)  # every decode of this process: bounded memory
        self.held = HeldUploads(SETTINGS.upload_memory_mib * 2**20)  # and the uploads it holds
        return_freed_memory_to_the_system()
        metrics = BatchMetrics()
        self.batcher = Batcher(
            self._classify_now, _batching_policy(SETTINGS), metrics.observe, on_queue=metrics.queued
        )
        self.heatmaps = HeatmapLane(
            heatmap_waiting_limit(SETTINGS),
            predicting=lambda: self.batcher.active_within(PREDICTING_WITHIN_S),
        )

    @bentoml.on_startup
    def follow_the_registry(self) -> None:
        """Start polling the champion pointer (every poll_interval_s; 0: never)."""
        self.follower.start()

    @bentoml.on_shutdown
    def stop_following(self) -> None:
        """Stop polling, batching and decoding."""
        self.follower.stop()
        self.batcher.close()
        self.decoder.close()

    @bentoml.api
    async def classify(self, images: list[bytes], k: int) -> Replies:
        """The top-k labels of each upload (its bytes as received), with the version and
        runtime of the one model that computed them, or why it was refused (see
        service/replies.py).

        Calls that arrive while a batch runs are batched together (service/batching.py):
        no learned wait, so a lone request after a burst goes at once."""
        return await self.classify_here(images, k)

    async def classify_here(self, images: list[bytes], k: int) -> list[dict]:
        """`classify` for a caller in this process (service/link.py), without BentoML's
        per-call wrapping of an API method. On the CPU the batch decodes the uploads,
        between forward passes (service/replies.py); with a GPU they are decoded here, and
        when one cannot be used no image of the request is classified (`{}` for the
        others). The front answers the first error either way."""
        try:
            with self.held.hold(sum(map(len, images))):
                if not SETTINGS.gpu:
                    return await self.batcher.submit([Upload(data, k) for data in images])
                uploads = await decode_uploads(self.decoder, images, k, self._input_size())
                if any(u.error for u in uploads):
                    return [u.error or {} for u in uploads]
                return await self.batcher.submit(uploads)
        except Rejected as exc:
            return [error_reply(exc)] * len(images)
        except Overloaded as exc:
            raise ServiceUnavailable(f"the model is overloaded: {exc}") from exc

    def _classify_now(self, uploads: list[Upload]) -> list[dict]:
        hook("model_call")  # a test seam: IMGCLS_HOOK_MODEL_CALL (imgcls/hooks.py)
        return classify_uploads(
            self.follower.served.predictor, uploads, self.decoder, SETTINGS.max_batch_size
        )

    def _input_size(self) -> tuple[int, int]:
        """The served model's (height, width), what uploads are decoded at on arrival."""
        return tuple(self.follower.served.predictor.card.image_size)

    @bentoml.api
    async def explain(self, image: bytes) -> dict:
        """Grad-CAM overlay (PNG bytes) of one upload for its predicted class, with the
        version that computed it, or why it was refused.

        Async only to wait for its turn: heatmaps run one at a time on a thread of their
        own (service/shedding.py), so a burst of /explain never holds the classify batches."""
        return await self.explain_here(image)

    async def explain_here(self, image: bytes) -> dict:
        """`explain` for a caller in this process (service/link.py). The overlay is drawn
        on a preview of at most 1024 px, a second decode (training's pixels are the model's)."""
        try:
            with self.held.hold(len(image)):
                (upload,) = await decode_uploads(self.decoder, [image], 1, self._input_size())
                if upload.error:
                    return upload.error
                # One after the other: together, two copies of a 40 MP image would not fit
                # the decode budget, and the second would get a 503.
                preview = await asyncio.get_running_loop().run_in_executor(
                    self.decoder.pool, self.decoder.preview, image, upload.arrived
                )
                return await self.heatmaps.run(self._explain, upload, preview)
        except (ImageDecodeError, Rejected) as exc:
            return error_reply(exc)

    def _explain(self, upload: Upload, preview: np.ndarray) -> dict:
        hook("heatmap")  # a test seam: IMGCLS_HOOK_HEATMAP (imgcls/hooks.py)
        predictor = self.follower.served.predictor
        if upload.size != tuple(predictor.card.image_size):  # a swap changed the input size
            upload.decode(self.decoder, tuple(predictor.card.image_size))
        if upload.error:
            return upload.error
        heat = predictor.heatmap(upload.pixels.astype(np.float32))
        return {**model_origin(predictor), "png": gradcam.overlay_png(preview, heat)}

    @bentoml.api
    async def describe(self) -> dict:
        """The served model's card, when and where it was loaded, and the follower's state.

        Async: it only reads memory, so it answers on the event loop at once instead of
        waiting for the worker thread behind a batch."""
        return self.status()

    def status(self) -> dict:
        """What `describe` answers, for a caller in this process (service/link.py)."""
        return {**self.follower.served.describe(), "following": self.follower.status()}


@bentoml.service(
    name="imgcls",
    workers=SETTINGS.front_workers,
    traffic={"timeout": SETTINGS.timeout_s + BACKSTOP_S},
    # One process: the front is the model's process, so it declares the model's GPU.
    **({"resources": {"gpu": 1}} if SETTINGS.gpu and SETTINGS.one_process else {}),
)
@bentoml.asgi_app(PAGE, path="/")
class ImageClassifier:
    """Public API: /predict, /predict_batch, /explain, /metadata and the page at /.

    FastAPI routes rather than `@bentoml.api` ones: they parse the upload themselves, so
    every client mistake (a wrong field name included) gets a 4xx with a JSON reason.
    Async: they await the upload and the model on the event loop, with no thread hop per
    request. The front keeps no model facts of its own: labels and version come back with
    each answer, so a swap in the model process can never mix two versions in one answer.
    """

    if not SETTINGS.one_process:  # else no model process starts: the front holds the model
        model_service = bentoml.depends(ClassifierModel)

    def __init__(self) -> None:
        self.model: ModelLink
        if SETTINGS.one_process:
            self.local_model = ClassifierModel()
            self.model = LocalLink(self.local_model)
        else:
            keep_off_accelerators()  # the front needs no accelerator: the GPU is the model's
            self.model = RemoteLink(self.model_service)
        _worker_started()
        self.settings = SETTINGS
        self.held = HeldUploads(SETTINGS.front_upload_memory_mib * 2**20)  # the uploads it answers
        self._ready = False  # once the model answered
        return_freed_memory_to_the_system()

    @bentoml.on_startup
    def start(self) -> None:
        """With one process, what BentoML does for a model process of its own: follow the
        registry."""
        if SETTINGS.one_process:
            self.local_model.follow_the_registry()

    @bentoml.on_shutdown
    def stop_the_local_model(self) -> None:
        if SETTINGS.one_process:
            self.local_model.stop_following()

    async def __is_ready__(self) -> bool:
        """Ready once the model process has loaded and warmed up the champion."""
        if not self._ready:
            try:
                await self.model.describe()
            except Exception:  # the model process is still starting
                return False
            self._ready = True
        return True

    @PAGE.post("/predict")
    async def predict(self, image: ImageField, top_k: TopK = None) -> dict:
        """Top-k labels of one uploaded image (multipart field `image`)."""
        reply = (await self._classify([("image", image)], top_k))[0]
        return self._answer([reply])[0]

    @PAGE.post("/predict_batch")
    async def predict_batch(self, images: list[ImageField], top_k: TopK = None) -> dict:
        """Top-k labels of several images (repeated field `images`), one result each, in order."""
        limit = self.settings.max_batch_images
        if len(images) > limit:
            raise Rejected(400, f"too many images: {len(images)}, at most {limit}")
        replies = await self._classify([(f"image {i}", u) for i, u in enumerate(images)], top_k)
        results = self._answer(replies)
        return {**_origin(replies[0]), "results": [_without_origin(r) for r in results]}

    @PAGE.post("/explain", response_class=Response, responses={200: EXPLAINED})
    async def explain(self, image: ImageField) -> Response:
        """Grad-CAM overlay (PNG) of one uploaded image for its predicted class."""
        with self.held.hold(image.size or 0):
            reply = await self.model.explain(await read_upload(image, "image", self.settings))
        refuse(reply, "image", image.filename)
        headers = {"X-Model-Version": str(reply["version"])}
        return Response(reply["png"], media_type="image/png", headers=headers)

    @PAGE.get("/metadata")
    async def metadata(self) -> dict:
        """Classes, backbone, input size, version, when it was loaded, and the follower's state."""
        return await self.model.describe()

    @PAGE.get("/", response_class=FileResponse)
    def page(self) -> FileResponse:
        """The drop-an-image page."""
        return FileResponse(STATIC / "index.html")

    async def _classify(self, uploads: list[tuple[str, UploadFile]], k: int | None) -> list[dict]:
        """The model's replies to uploads, all from one version (service/replies.py)."""
        with self.held.hold(sum(upload.size or 0 for _, upload in uploads)):
            blobs = [await read_upload(upload, what, self.settings) for what, upload in uploads]
            replies = await self.model.classify(blobs, k or self.settings.top_k)
        for (what, upload), reply in zip(uploads, replies, strict=True):
            refuse(reply, what, upload.filename)
        return replies

    def _answer(self, replies: list[dict]) -> list[dict]:
        """Response bodies for model replies; counts them in /metrics."""
        answers = []
        for reply in replies:
            preds = reply["predictions"]
            observe_prediction(preds[0])
            verdict = abstention(preds, self.settings.min_confidence)  # {} unless --min-confidence
            answers.append({**_origin(reply), **verdict, "predictions": preds})
        count_abstentions(answers)
        return answers


ORIGIN = ("model", "version", "runtime", "precision")


def _origin(reply: dict) -> dict:
    return {k: reply[k] for k in ORIGIN}


def _without_origin(answer: dict) -> dict:
    """One result of /predict_batch: its predictions (and abstention), not the shared origin."""
    return {k: v for k, v in answer.items() if k not in ORIGIN}


install_error_handlers(PAGE)
# Outermost first: a request ID and the error shape on every answer, the API key, the
# public routes in BentoML's /schema.json, the per-route concurrency limits, the deadline
# (504), the byte limit.
ImageClassifier.add_asgi_middleware(ErrorShapeMiddleware)
ImageClassifier.add_asgi_middleware(ApiKeyMiddleware, settings=SETTINGS)
ImageClassifier.add_asgi_middleware(PublicSchemaMiddleware, page=PAGE)  # BentoML's clients
ImageClassifier.add_asgi_middleware(RouteLimitMiddleware, limits=front_limits(SETTINGS))
ImageClassifier.add_asgi_middleware(DeadlineMiddleware, timeout_s=SETTINGS.timeout_s)
ImageClassifier.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_upload_bytes)
