"""The compiled build of a served version: OpenVINO, verified against Keras before it serves.

`compile_verified(predictor, ...)` gives a loaded version the fastest build that passed on
this machine. The Keras model is exported to OpenVINO IR once per version and OpenVINO
release (`model.export(..., format="openvino")`, through TensorFlow), under a file lock so
N model workers convert once; OpenVINO's own model cache (`CACHE_DIR`) keeps the compiled
blob per precision beside it, so a restart or a second worker only imports it. The
build is then checked against the in-process Keras model on the version's parity set
(up to 200 of its held-out images, stored with its model: imgcls/parity.py); Keras's
probabilities there are kept beside the build, keyed by this machine's CPU and software,
so another worker or a restart checks the build without running Keras on the set again, and
so is the verdict, keyed by the bytes of the build's files, so a rollback to a version
checked here does not run the build on the set again either:

- f32: top-1 identical on every image and max |p_keras - p_compiled| <= F32_BOUND;
- bf16, only where the CPU reports BF16: top-1 agreement >= BF16_AGREEMENT on at least
  BF16_MIN_INPUTS images.

What fails, or cannot be built, is not served: Keras computes, and `Runtime.reason` says
why (`/metadata`, the log, `imgcls_compiled_fallbacks` in /metrics). Keras and NumPy only
here: OpenVINO is imported lazily, and its export needs TensorFlow (a JAX-only install
serves Keras, with one log line).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "openvino")
PRECISIONS = ("auto", "f32", "bf16")
# f32 against Keras: measured 1e-6 to 2e-6 on ResNet50 and VGG16 (docs/benchmarks.md); the
# bound leaves two orders of magnitude for other graphs and CPUs.
F32_BOUND = 1e-4
# bf16 rounds every activation to 8 bits of mantissa: a near-tie may flip, so top-1 is
# checked as agreement on enough images to mean something, not identity.
BF16_AGREEMENT = 0.99
BF16_MIN_INPUTS = 200
BUILD_FILE = "model.xml"
# training/model.py's name for the augmentation block (identity at inference).
AUGMENTATION = "augmentation"


@dataclass(frozen=True)
class Runtime:
    """What computes a version's probabilities, in which precision, and why."""

    name: str  # "openvino" or "keras"
    precision: str  # "f32" or "bf16" (Keras: its dtype policy's compute dtype)
    reason: str
    fallback: bool = False  # a compiled build was wanted and could not serve

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "reason": self.reason}


KERAS = Runtime("keras", "f32", "--runtime keras, or --gpu with --runtime auto")


class CompiledModel:
    """An OpenVINO compiled model; one infer request per calling thread (the batch thread
    and /explain's thread call it at once)."""

    def __init__(self, compiled: Any):
        self._compiled = compiled
        self._local = threading.local()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        return np.array(request.infer([np.ascontiguousarray(batch, np.float32)])[0], np.float32)


def compile_verified(
    predictor: Any, runtime: str, precision: str, folder: Path | None, parity: np.ndarray | None
) -> None:
    """Set `predictor.engine` (the verified build, or None: Keras) and `predictor.runtime`.

    `folder`: where this version's build is kept (None: a temporary one, dropped after).
    """
    predictor.engine, predictor.runtime = None, KERAS
    if runtime == "keras":
        return
    started = time.monotonic()
    with falling_back(predictor):
        engine, chosen = _build_and_check(predictor, precision, folder, parity)
        predictor.engine, predictor.runtime = engine, chosen
        logger.info("version %s serves OpenVINO %s (%s; %.1f s)", predictor.version, chosen.precision,
                    chosen.reason, time.monotonic() - started)  # fmt: skip


@contextlib.contextmanager
def falling_back(predictor: Any):
    """What fails inside the block leaves Keras serving the version, with the reason."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the compiled path never stops a version serving
        reason = (
            str(exc) if isinstance(exc, Unavailable) else f"the build failed: {type(exc).__name__}: {exc}"
        )
        predictor.engine = None
        predictor.runtime = Runtime("keras", "f32", reason[:400], fallback=True)
        logger.warning("version %s serves Keras: %s", predictor.version, predictor.runtime.reason)


class Unavailable(RuntimeError):
    """No compiled build can serve this version here; the message says why."""


def _build_and_check(predictor, precision: str, folder: Path | None, parity) -> tuple[CompiledModel, Runtime]:
    if parity is None or len(parity) == 0:
        raise Unavailable("it has no parity set (registered before compiled builds were checked)")
    ov = openvino()
    core = ov.Core()
    capable = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    wanted = _precisions(precision, capable, len(parity))
    with _build_folder(folder) as where:
        with _locked(where / ".lock"):  # N workers: one export, one compile per precision
            xml = export_build(predictor.model, where)
        x = parity.astype(np.float32)
        key = _reference_key(predictor.model, x)
        reference = _reference(predictor.model, x, where, key)
        refusals = []
        for choice in wanted:
            with _locked(where / ".lock"):
                compiled = core.compile_model(core.read_model(str(xml)), "CPU", config(choice, where))
            engine = CompiledModel(compiled)
            check = lambda c=choice, e=engine: _disagreement(c, reference, _batched(e, x))  # noqa: E731
            refusal = _verdict(where, f"{key}|{choice}|{ov.__version__}", check)
            if refusal is None:
                why = "; ".join([_why(choice, precision, capable, len(x)), *refusals])
                return engine, Runtime("openvino", _precision_of(compiled),
                                       f"{why}; matched Keras on {len(x)} parity images")  # fmt: skip
            refusals.append(refusal)
    raise Unavailable("; ".join(refusals) or "no precision to try")


def _precisions(asked: str, capable: bool, inputs: int) -> list[str]:
    """The precisions to try, best first."""
    if asked == "f32":
        return ["f32"]
    if asked == "bf16":
        if not capable:
            raise Unavailable("--precision bf16: this CPU reports no BF16 to OpenVINO")
        if inputs < BF16_MIN_INPUTS:
            raise Unavailable(f"--precision bf16 needs {BF16_MIN_INPUTS} parity images, it has {inputs}")
        return ["bf16"]
    return (["bf16"] if capable and inputs >= BF16_MIN_INPUTS else []) + ["f32"]


def _why(choice: str, asked: str, capable: bool, inputs: int) -> str:
    if asked != "auto":
        return f"--precision {asked}"
    if choice == "bf16":
        return "auto: the CPU reports BF16"
    if not capable:
        return "auto: the CPU reports no BF16"
    if inputs < BF16_MIN_INPUTS:
        return f"auto: bf16 needs {BF16_MIN_INPUTS} parity images, this version has {inputs}"
    return "auto: bf16 did not match"


def _disagreement(choice: str, reference: np.ndarray, got: np.ndarray) -> str | None:
    """Why the build's outputs do not match Keras's on the parity set, or None."""
    same = got.argmax(1) == reference.argmax(1)
    if choice == "f32":
        diff = float(np.abs(got - reference).max())
        if not same.all():
            return f"f32 build: top-1 differs from Keras on {int((~same).sum())} of {len(same)} parity images"
        if diff > F32_BOUND:
            return f"f32 build: max probability difference {diff:.2g} > {F32_BOUND:g}"
        return None
    if same.mean() < BF16_AGREEMENT:
        return f"bf16 build: top-1 agrees with Keras on {same.mean():.1%} < {BF16_AGREEMENT:.0%} of parity images"
    return None


def config(precision: str, folder: Path) -> dict[str, Any]:
    """LATENCY: the batcher runs one batch at a time, so one stream on every core (THROUGHPUT
    on 2 cores would run 2 single-thread streams)."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": len(os.sched_getaffinity(0)),
        "CACHE_DIR": str(folder / "compiled"),  # OpenVINO's blob cache, keyed by its config
    }


def _precision_of(compiled: Any) -> str:
    """The precision the compiled model reports (INFERENCE_PRECISION_HINT), as f32/bf16."""
    value = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    return "bf16" if "bf16" in value or "bfloat16" in value else "f16" if "f16" in value else "f32"


def _verdict(where: Path, key: str, check) -> str | None:
    """`check()`, the build's refusal on the parity set (None: it matched), kept per `key`
    (the reference's, the precision, OpenVINO's version) and the bytes of the build's files
    (IR and OpenVINO's compiled blobs): a restart, a second worker or a rollback to a version
    checked here reads it instead of running the parity set again (30 s for ResNet50 on 2
    busy cores). A build file changed since, by a byte, is checked again."""
    import hashlib

    digest = hashlib.blake2b(key.encode(), digest_size=16)
    for path in [where / BUILD_FILE, where / "model.bin", *sorted((where / "compiled").glob("*.blob"))]:
        with open(path, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 22), b""):
                digest.update(chunk)
    path = where / f"verdict-{digest.hexdigest()}.txt"
    with contextlib.suppress(OSError):
        text = path.read_text()
        return text or None
    refusal = check()
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(refusal or "")
    os.replace(partial, path)
    return refusal


def _reference(model, x: np.ndarray, where: Path, key: str) -> np.ndarray:
    """Keras's probabilities on the parity set `x`: computed once per build folder and
    `key` (parity set, weights, CPU and software: `_reference_key`), under the folder's
    lock, so N workers compute them once, read back after that. An unreadable or mismatched
    file is computed again."""
    path = where / f"reference-{key}.npy"
    with _locked(where / ".lock"):
        with contextlib.suppress(Exception):  # unreadable, truncated, wrong: computed again
            kept = np.load(path)
            if kept.shape == (len(x), model.output_shape[-1]) and np.isfinite(kept).all():
                return kept
        reference = _keras_probabilities(model, x)
        partial = path.with_name(f".{path.name}")
        with open(partial, "wb") as handle:
            np.save(handle, reference)
            handle.flush()
            os.fsync(handle.fileno())  # whole on disk before it is named
        os.replace(partial, path)
    return reference


def _reference_key(model, x: np.ndarray) -> str:
    """A digest of the model's weights, the parity set, the CPU (model and flags) and the
    Keras stack: what Keras's probabilities on it depend on."""
    import hashlib

    import keras

    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    digest = hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16)
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    backend = keras.backend.backend()
    stack = f"{keras.__version__}|{backend} {getattr(sys.modules.get(backend), '__version__', '')}|{np.__version__}"
    digest.update(f"{cpu}|{stack}".encode())
    return digest.hexdigest()[:16]


def _keras_probabilities(model, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model.predict_on_batch(x[i : i + 32])) for i in range(0, len(x), 32)])


def _batched(engine: CompiledModel, x: np.ndarray) -> np.ndarray:
    return np.concatenate([engine(x[i : i + 32]) for i in range(0, len(x), 32)])


def export_build(model, folder: Path) -> Path:
    """`folder/model.xml` (+ .bin), the Keras model's OpenVINO IR, exported once (callers
    hold the folder's lock): into a temporary folder, then renamed in. A corrupted build
    is not caught here: it fails the parity check and Keras serves."""
    xml = folder / BUILD_FILE
    if xml.exists():
        return xml
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    partial = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        with _quiet_export():
            inference_graph(model).export(str(partial / BUILD_FILE), format="openvino", verbose=False)
        os.replace(partial / "model.bin", folder / "model.bin")
        os.replace(partial / BUILD_FILE, xml)  # last: the .xml says the build is whole
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("exported the OpenVINO build to %s in %.1f s", folder, time.monotonic() - started)
    return xml


def inference_graph(model):
    """The model without its augmentation block: identity at inference, but its random
    image ops (ImageProjectiveTransformV3, StatelessRandom*) have no OpenVINO conversion.
    The product's models are a chain of top-level layers; like any build, the result is
    checked against the Keras model on the parity set."""
    if AUGMENTATION not in [layer.name for layer in model.layers]:
        return model
    import keras

    inputs = keras.Input(shape=model.input_shape[1:], name=model.layers[0].name)
    x = inputs
    for layer in model.layers[1:]:
        if layer.name != AUGMENTATION:
            x = layer(x)
    return keras.Model(inputs, x, name=model.name)


@contextlib.contextmanager
def _build_folder(folder: Path | None):
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="imgcls-build-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


@contextlib.contextmanager
def _quiet_export():
    """The export converts through TensorFlow: an unavailable TF is a reason, not a crash."""
    try:
        yield
    except ImportError as exc:
        raise Unavailable(f"the OpenVINO export needs TensorFlow here ({exc})") from exc
    except Exception as exc:
        raise Unavailable(f"the OpenVINO export failed: {type(exc).__name__}: {exc}"[:400]) from exc


@functools.cache
def openvino():
    """The openvino module, with its telemetry off; Unavailable when it cannot load.

    OpenVINO sends usage events unless a consent file in the user's home says no; its
    conversion code falls back to a no-op stub when `openvino_telemetry` cannot be
    imported, which this arranges for this process only."""
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    try:
        import openvino as ov
    except Exception as exc:
        raise Unavailable(f"OpenVINO cannot be loaded here ({type(exc).__name__}: {exc})") from exc
    return ov


def build_folder(version_folder: Path) -> Path:
    """Where a version's build lives: keyed by version (the folder) and OpenVINO release;
    the precision keys OpenVINO's own blob cache inside it."""
    try:
        release = openvino().__version__.split("-")[0]
    except Unavailable:
        release = "unavailable"
    return version_folder / f"openvino-{release}"
