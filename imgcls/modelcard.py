"""What travels with a saved model: its classes, input size, backbone and metrics.

Stored as MLflow model metadata (`log_model(metadata=...)`) and as BentoML model metadata,
so the service never re-derives class names from a folder listing.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelCard(BaseModel):
    """Facts about a trained model that every consumer of it needs."""

    class_names: list[str] = Field(min_length=2)
    image_size: tuple[int, int] = Field(description="(height, width) of the model's input.")
    backbone: str
    metrics: dict[str, float] = Field(default_factory=dict)
    dataset_fingerprint: str | None = None
    # The saved model takes raw RGB pixels 0-255 at `image_size`; see imgcls.images.
    input_format: str = "rgb_uint8_range"
    # Which resize made its training pixels (imgcls.images.PREPROCESSING_VERSION): 1, the
    # Keras bilinear resize, for cards written before the field; training writes the
    # current one. The service serves both with today's resize (docs/training.md: "Preprocessing").
    preprocessing: int = Field(1, ge=1)
    # The temperature T its probabilities were scaled by (training/calibrate.py): already
    # inside the saved model, recorded here for people. 1: not calibrated (older cards).
    temperature: float = Field(1.0, gt=0)
    # The classifier on the backbone, in words (training.model.head_summary): which blocks
    # it reads, how many heads it averages. None on older cards and for simple_cnn.
    head: str | None = None

    def to_metadata(self) -> dict:
        """A JSON-safe dict for MLflow/BentoML metadata (BentoML refuses None values: unset
        optional fields are left out, and read back as None)."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> ModelCard:
        """Rebuild a card from stored metadata; raises ValueError if it is missing."""
        if not metadata or "class_names" not in metadata:
            raise ValueError("model has no imgcls metadata (class_names, image_size, backbone)")
        return cls.model_validate(metadata)
