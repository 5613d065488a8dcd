"""Classify a folder (or a list) of image files offline, into a CSV: `imgcls predict`'s work
(its command-line edge is service/predict_cli.py).

The same model and preprocessing as the service: the champion (or `--version N`) is
loaded by `service.sources.load_predictor`, each file goes through
`Predictor.preprocess` (`imgcls.images.model_input` at the card's size) and each batch
through `Predictor.probabilities`. Files are read and decoded on a thread pool while the
model runs the previous batch. A file that cannot be used is not fatal: its row has an
`error` column saying why, and the terminal counts them.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Files decoded at once beside the model (Pillow releases the GIL while decoding).
DECODE_THREADS = min(8, os.cpu_count() or 2)


@dataclass
class Row:
    """One line of the CSV: a file and its top-k labels, or why it has none."""

    path: str
    labels: list[tuple[str, float]]
    error: str = ""
    abstained: bool | None = None  # with a --min-confidence threshold (service/abstain.py)


@dataclass
class Summary:
    """What `predict_files` did, for the terminal."""

    images: int
    skipped: int
    seconds: float
    version: str
    abstained: int = 0
    runtime: str = "keras f32"  # what computed it: runtime and precision


def list_files(inputs: list[Path]) -> list[Path]:
    """Every file named, and every file under each folder (sorted, hidden ones skipped);
    raises FileNotFoundError naming a path that does not exist."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = (p for p in item.rglob("*") if p.is_file())
            files += sorted(
                p for p in found if not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return files


def predict_files(
    predictor,
    files: list[Path],
    out: Path,
    *,
    top_k: int = 3,
    batch_size: int = 32,
    min_confidence: float | None = None,
) -> Summary:
    """Classify `files` in batches and write the CSV `out`; progress on the terminal
    or in the log (imgcls/progress.py).

    With `min_confidence`, rows whose top probability is below it say so in an `abstained`
    column (service/abstain.py); the labels are written either way."""
    from imgcls.progress import Progress

    start, done, skipped, abstained = time.perf_counter(), 0, 0, 0
    with open(out, "w", newline="") as file, Progress("predict", len(files), "files", log) as progress:
        writer = csv.writer(file)
        writer.writerow(csv_header(top_k, abstain=bool(min_confidence)))
        for rows in predict_batches(predictor, files, top_k, batch_size):
            for row in rows:
                row.abstained = _abstained(row, min_confidence)
                writer.writerow(csv_row(row, top_k, predictor.version, abstain=bool(min_confidence)))
            done += len(rows)
            skipped += sum(1 for row in rows if row.error)
            abstained += sum(1 for row in rows if row.abstained)
            progress.advance(len(rows))
    runtime = f"{predictor.runtime.name} {predictor.runtime.precision}"
    return Summary(
        done - skipped, skipped, time.perf_counter() - start, predictor.version, abstained, runtime
    )


def _abstained(row: Row, min_confidence: float | None) -> bool | None:
    from service.abstain import abstention

    if not min_confidence or not row.labels:
        return None
    return abstention([{"label": row.labels[0][0], "probability": row.labels[0][1]}], min_confidence)[
        "abstained"
    ]


def predict_batches(predictor, files: list[Path], top_k: int, batch_size: int) -> Iterator[list[Row]]:
    """Rows of each batch of files, in order; the next batch decodes while this one runs."""
    from service.predictor import top_k as best

    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        pending = [pool.submit(_model_input, predictor, f) for f in batches[0]] if batches else []
        for index, batch in enumerate(batches):
            current = pending
            if index + 1 < len(batches):
                pending = [pool.submit(_model_input, predictor, f) for f in batches[index + 1]]
            yield _rows(predictor, batch, current, top_k, best)


def _rows(predictor, batch: list[Path], futures: list[Future], top_k: int, best) -> list[Row]:
    inputs = [future.result() for future in futures]
    good = [x for x in inputs if isinstance(x, np.ndarray)]
    probs = iter(predictor.probabilities(np.stack(good)) if good else [])
    rows = []
    for path, x in zip(batch, inputs, strict=True):
        if isinstance(x, str):
            rows.append(Row(str(path), [], x))
        else:
            labels = best(next(probs), predictor.card.class_names, top_k)
            rows.append(Row(str(path), [(p["label"], p["probability"]) for p in labels]))
    return rows


def _model_input(predictor, path: Path) -> np.ndarray | str:
    """The model's float32 input for one file, or the reason it has none."""
    from imgcls.images import ImageDecodeError

    try:
        return predictor.preprocess(path.read_bytes())
    except ImageDecodeError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"


def csv_header(top_k: int, abstain: bool = False) -> list[str]:
    """path, label_1, probability_1, ..., label_k, probability_k, [abstained,] version, error."""
    ranks = [column for i in range(1, top_k + 1) for column in (f"label_{i}", f"probability_{i}")]
    return ["path", *ranks, *(["abstained"] if abstain else []), "version", "error"]


def csv_row(row: Row, top_k: int, version: str, abstain: bool = False) -> list[str]:
    """One CSV line; a file with fewer labels than `top_k` (or an error) has empty cells.
    With `abstain`, an `abstained` cell: true, false, or empty for a file in error."""
    cells = [cell for label, p in row.labels for cell in (label, f"{p:.6f}")]
    cells += [""] * (2 * top_k - len(cells))
    if abstain:
        cells.append("" if row.abstained is None else str(row.abstained).lower())
    return [row.path, *cells, version, row.error]
