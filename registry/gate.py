"""The promotion gate as a pure decision over two evaluations on the same images."""

from __future__ import annotations

from registry.settings import RegistrySettings
from training.evaluate import Evaluation

# Calibration figures (training/calibrate.py): shown beside accuracy and macro-F1 for
# candidate and champion, never gated on (temperature scaling leaves the ranking alone).
LOWER_IS_BETTER = ("ece", "nll")


def gate_metrics(evaluation: Evaluation) -> dict[str, float]:
    """The numbers the gate looks at (accuracy, macro-F1, each class's recall) and shows
    beside them (ECE and NLL)."""
    return gate_subset(evaluation.metrics())


def gate_subset(metrics: dict[str, float]) -> dict[str, float]:
    """Of a version's metrics, the ones the gate looks at or shows (and a history record keeps)."""
    keep = ("accuracy", "macro_f1", *LOWER_IS_BETTER)
    return {k: v for k, v in metrics.items() if k in keep or k.startswith("recall_")}


def class_mismatch(candidate_classes: list[str], champion_classes: list[str]) -> str | None:
    """Why two models cannot be compared, or None when their classes are the same."""
    if list(candidate_classes) == list(champion_classes):
        return None
    return (
        f"the champion was trained on different classes {champion_classes} than the candidate "
        f"{candidate_classes}: the gate cannot compare them (use --force with a reason to replace it)"
    )


def decide(
    candidate: Evaluation, champion: Evaluation | None, settings: RegistrySettings
) -> tuple[bool, str]:
    """(passed, why) for a candidate against the champion, both evaluated on the same images."""
    metric = settings.gate_metric
    if metric in LOWER_IS_BETTER:
        raise ValueError(f"gate metric {metric!r} is a calibration figure (lower is better): gate on accuracy "
                         "or macro_f1")  # fmt: skip
    cand = candidate.metrics()
    if metric not in cand:
        raise ValueError(f"gate metric {metric!r} is not one of {sorted(cand)}")
    if champion is None:
        return _first_model(cand[metric], metric, settings.first_model_floor)
    champ = champion.metrics()
    reasons = []
    gain = cand[metric] - champ[metric]
    if gain < settings.margin:
        reasons.append(
            f"{metric} {cand[metric]:.4f} vs champion {champ[metric]:.4f}: "
            f"gain {gain:+.4f} is below the margin {settings.margin}"
        )
    worst, drop = _largest_recall_drop(candidate, champion)
    if drop > settings.max_recall_drop:
        reasons.append(
            f"recall of class '{worst}' falls by {drop:.4f} "
            f"(more than the allowed {settings.max_recall_drop})"
        )
    if reasons:
        return False, "; ".join(reasons)
    return True, (
        f"{metric} {cand[metric]:.4f} beats champion {champ[metric]:.4f} by {gain:+.4f} "
        f"(margin {settings.margin}); largest recall drop {max(drop, 0):.4f}"
    )


def _first_model(value: float, metric: str, floor: float) -> tuple[bool, str]:
    if value >= floor:
        return True, f"first champion: {metric} {value:.4f} meets the floor {floor}"
    return False, f"no champion yet, and {metric} {value:.4f} is below the floor {floor}"


def _largest_recall_drop(candidate: Evaluation, champion: Evaluation) -> tuple[str, float]:
    """The class whose recall falls most from champion to candidate, and by how much."""
    new, old = candidate.per_class_recall(), champion.per_class_recall()
    drops = {name: old[name] - new[name] for name in old}
    worst = max(drops, key=drops.get)
    return worst, drops[worst]
