"""The serving benchmarks' models: untrained classifiers registered in a temporary MLflow
store (alias `champion`) with a parity set of the benchmark's photos, or one trained by the
product itself (`vgg16`), and copied into a temporary BentoML store."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.harness import SHARED
from imgcls import parity

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# case -> (backbone, input size); the demo model is the course CNN `imgcls demo` trains.
# vgg16 is trained (issue 20's bf16 target: a trained head on photos, ImageNet weights).
CASES = {"resnet50": ("resnet50", 224), "demo": ("simple_cnn", 32), "vgg16": ("vgg16", 224)}
TRAINED = ("vgg16",)
# CIFAR-10 photos per class in the trained case's folder: 800 images, so its held-out
# splits (test 15%, validation 30 a class) give the parity set the 200 images bf16 needs.
TRAINED_PER_CLASS = 80
ALIAS = "champion"


@dataclass
class Case:
    """A registered benchmark model: its MLflow name/version and BentoML store tag."""

    key: str
    name: str
    size: int
    version: str
    bento_tag: str
    keras_file: Path | None = None  # the registered version's own file (the peers serve it)


def tracking_settings(work: Path):
    """A temporary SQLite MLflow store inside `work` (never the project's .imgcls)."""
    from imgcls.settings import TrackingSettings

    return TrackingSettings(
        home=work, tracking_uri=f"sqlite:///{work}/mlflow.db", experiment_name="serve-bench"
    )


def untrained_model(backbone: str, size: int, classes: int = len(CLASSES)):
    """An untrained classifier (`weights=none`: speed does not depend on weight values),
    built as training builds it, augmentation off."""
    from training.config import load_config
    from training.model import build_model

    options = {"backbone": backbone, "weights": "none", "image_size": size, "augment.enabled": False}
    return build_model(load_config(None, data=Path("."), **options), classes)


def parity_images(size: int, shared: Path = SHARED, count: int = parity.PARITY_IMAGES):
    """`count` of the benchmark's photos (bench/photos.py) as the model's uint8 inputs at
    `size`: a parity set as training stores one, so the service may serve a compiled
    build (200 images: enough for bf16, service/compiled.py BF16_MIN_INPUTS)."""
    import numpy as np

    from bench.photos import photo_jpegs
    from imgcls.images import model_input

    jpegs, _source = photo_jpegs(shared, count)
    return np.stack([model_input(data, (size, size)) for data in jpegs])


def register_case(key: str, work: Path, name: str | None = None, parity_set=None) -> Case:
    """Log, register (as `name`, default `serve-bench-KEY`), alias `champion` and copy into
    the BentoML store one case's model, with `parity_set` (uint8 inputs; default:
    `parity_images`). Called again with the same name, it registers the next version
    and moves the alias to it."""
    import mlflow
    import numpy as np

    from imgcls.modelcard import ModelCard
    from training.tracking import log_keras_model, tracked_run

    backbone, size = CASES[key]
    card = ModelCard(
        class_names=CLASSES, image_size=(size, size), backbone=backbone, dataset_fingerprint="serve-bench"
    )
    model = untrained_model(backbone, size)
    example = np.zeros((1, size, size, 3), np.float32)
    with tracked_run(tracking_settings(work), run_name=f"serve-bench-{key}"):
        uri = log_keras_model(model, card, example, parity_images(size) if parity_set is None else parity_set)
    name = name or f"serve-bench-{key}"
    version = str(mlflow.register_model(uri, name).version)
    mlflow.MlflowClient().set_registered_model_alias(name, ALIAS, version)
    return Case(key, name, size, version, *bento_copy(name, version, card, work))


def train_case(key: str, work: Path, shared: Path = SHARED) -> tuple[Case, list[tuple[Path, int]]]:
    """Train the case with the product's default command (`imgcls train`'s `train`) on
    CIFAR-10 photos upscaled to 256 px (bench/train_data.py) with the ImageNet VGG16 file
    of ../shared, register it (alias `champion`, its own parity set) and copy it into the
    BentoML store; also its test split as (file, label)."""
    import mlflow

    from bench.train_data import photo_folder
    from training.config import load_config
    from training.train import train

    backbone, size = CASES[key]
    folder = photo_folder(
        shared / "data/cifar10-small.tar.gz", work / "photos", len(CLASSES), TRAINED_PER_CLASS
    )
    weights = shared / "weights" / f"{backbone}_imagenet_notop.h5"
    config = load_config(None, data=folder, backbone=backbone, weights=str(weights), image_size=size)
    settings = tracking_settings(work)
    result = train(config, settings)
    if list(result.card.class_names) != CLASSES:
        raise RuntimeError(f"the photo folder's classes {result.card.class_names} are not {CLASSES}")
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = f"serve-bench-{key}"
    version = str(mlflow.register_model(result.model_uri, name).version)
    mlflow.MlflowClient().set_registered_model_alias(name, ALIAS, version)
    test = [(folder / path, label) for path, label in result.scan.files["test"]]
    return Case(key, name, size, version, *bento_copy(name, version, result.card, work)), test


def bento_copy(name: str, version: str, card, work: Path) -> tuple[str, Path]:
    """Save the registered version's own `.keras` file into the BentoML store; its tag and
    the downloaded file (kept in `work`)."""
    import mlflow

    from service.store import ALIAS_LABEL, REGISTERED_LABEL, save_to_bento_store

    dest = Path(tempfile.mkdtemp(prefix="download-", dir=work))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=dest))
    keras_file = next(iter(sorted(local.rglob("*.keras"))))
    labels = {REGISTERED_LABEL: name, ALIAS_LABEL: ALIAS}
    tag = save_to_bento_store(keras_file, card, name=name, version=version, extra_labels=labels,
                              parity_path=parity.find(local))  # fmt: skip
    return tag, keras_file
