"""Augmentation presets, and the rule that picks one from what the scan saw.

Presets:
- `photo`: horizontal flip, small rotation, zoom, contrast and translation (a photo
  mirrored is still the same thing);
- `orientation_bound`: digits, documents and other images whose orientation carries
  meaning: no flips, small rotation and translation, a little zoom;
- `none`: no augmentation; a frozen backbone then runs once and the head trains on cached
  features.

`augment.preset: auto` (the default) is resolved once per run by `choose_preset`; the
choice and its reason are logged with the run. Fields set explicitly in the config
(`flip`, `rotation`, ...) override the preset's values.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.config import AugmentConfig, TrainConfig

# The layer settings of each preset (fractions as Keras' random layers take them).
PRESETS: dict[str, dict[str, object]] = {
    "photo": {"flip": "horizontal", "rotation": 0.05, "zoom": 0.1, "contrast": 0.1, "translation": 0.1},
    # 0.03 of a turn is ~11 degrees: a slanted digit, not another one.
    "orientation_bound": {
        "flip": "none",
        "rotation": 0.03,
        "zoom": 0.05,
        "contrast": 0.0,
        "translation": 0.05,
    },
    "none": {"flip": "none", "rotation": 0.0, "zoom": 0.0, "contrast": 0.0, "translation": 0.0},
}
LAYER_FIELDS = ("flip", "rotation", "zoom", "contrast", "translation")
# Most images greyscale (this share or more): digits, scans, documents.
GREYSCALE_SHARE = 0.5
# With this many training images in every class, a frozen backbone's features already
# cover what flips and crops would add, while an augmented epoch costs a whole backbone
# pass: `auto` then trains on cached features (the backbone runs once).
LARGE_PER_CLASS = 1000


@dataclass(frozen=True)
class ImageStats:
    """What the scan saw of the usable images: how many, how many grey, their size."""

    images: int
    greyscale: int
    median_short_side: int

    @property
    def greyscale_share(self) -> float:
        return self.greyscale / max(1, self.images)


@dataclass(frozen=True)
class Choice:
    """The preset a run uses and why (logged as the run's augment.preset / augment.reason)."""

    preset: str
    reason: str


def choose_preset(config: TrainConfig, stats: ImageStats | None, smallest_train_class: int) -> Choice:
    """The preset for this run: the user's, or the `auto` rule (docs/training.md: "Augmentation").

    Rule, in order: turned off or `none` -> none; a preset named -> that one;
    simple_cnn -> orientation_bound; mostly greyscale images -> orientation_bound; every
    class with LARGE_PER_CLASS+ training images (and no augmentation asked for) -> none;
    otherwise (colour images, pretrained backbone) -> photo.
    """
    augment = config.augment
    if not augment.enabled:
        return Choice("none", "augmentation turned off (augment.enabled: false, --no-augment)")
    if augment.preset != "auto":
        return Choice(augment.preset, "set by the user (augment.preset, --augment)")
    if config.backbone == "simple_cnn":
        return Choice("orientation_bound", "simple_cnn is the model for digits and other small images")
    if stats is not None and stats.greyscale_share >= GREYSCALE_SHARE:
        return Choice(
            "orientation_bound",
            f"{stats.greyscale_share:.0%} of the images are greyscale (digits, scans, documents): no flips",
        )
    asked = bool({"enabled", *LAYER_FIELDS} & augment.model_fields_set)
    if smallest_train_class >= LARGE_PER_CLASS and not asked:
        return Choice(
            "none",
            f"every class has {LARGE_PER_CLASS}+ training images: the frozen {config.backbone} "
            "runs once and the head trains on cached features",
        )
    size = f", median short side {stats.median_short_side} px" if stats is not None else ""
    return Choice("photo", f"colour images{size} with a pretrained {config.backbone}")


def resolve(config: TrainConfig, choice: Choice) -> TrainConfig:
    """`config` with its augment section made explicit for `choice`: the preset's layer
    settings, overridden by the fields the user set."""
    augment = AugmentConfig(
        **(layer_settings(config.augment, choice.preset) | {"preset": choice.preset}),
        enabled=choice.preset != "none",
    )
    return config.model_copy(update={"augment": augment})


def layer_settings(augment: AugmentConfig, preset: str | None = None) -> dict[str, object]:
    """flip, rotation, zoom, contrast, translation: the preset's (`auto` before it is
    resolved counts as `photo`) with the explicitly set fields on top."""
    name = preset or augment.preset
    values = dict(PRESETS["photo" if name == "auto" else name])
    values.update({f: getattr(augment, f) for f in LAYER_FIELDS if getattr(augment, f) is not None})
    return values
