"""An optional abstain threshold: below it, an answer says the model abstained.

`imgcls serve --min-confidence P` (`IMGCLS_SERVE_MIN_CONFIDENCE`; off by default). With
a threshold set, every answer (each result of /predict_batch too) carries
`"abstained"` and `"label"`: the top-1 label when its probability is at least P, else
`"label": null` and `"abstained": true`, so a client that reads `label` cannot act on a
guess by accident. The top-k `predictions` are listed either way. Abstentions are counted
in /metrics as `imgcls_abstentions_total`. Probabilities are the model's calibrated ones
(training/calibrate.py), so P reads as "right at least P of the time".
"""

from __future__ import annotations

import functools
from typing import Any


def abstention(predictions: list[dict], min_confidence: float | None) -> dict[str, Any]:
    """`{"abstained", "label"}` for one image's top-k (most probable first); `{}` when off."""
    if not min_confidence:
        return {}
    best = predictions[0]
    abstained = best["probability"] < min_confidence
    return {"abstained": abstained, "label": None if abstained else best["label"]}


def count_abstentions(answers: list[dict[str, Any]]) -> None:
    """Add the answers that abstained to `imgcls_abstentions_total`."""
    abstained = sum(1 for answer in answers if answer.get("abstained"))
    if abstained:
        _counter().inc(abstained)


@functools.cache
def _counter():
    """Created on first use, like service/metrics.py's: BentoML sets prometheus'
    multiprocess folder when a worker starts."""
    import prometheus_client

    return prometheus_client.Counter(
        "imgcls_abstentions", "Answers below the --min-confidence threshold (abstained)"
    )
