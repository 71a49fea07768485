"""Predictions on files, without a server: ``hematovision predict PATH...``.

Uses the service's own preparation (format checks, the training decoder) and model call, so a
folder predicted here gets exactly the answers the service would give; a bad file gets its error
in its row instead of stopping the run.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hematovision.model.open_set import UNKNOWN
from hematovision.progress import Progress
from hematovision.serving.batcher import run_model
from hematovision.serving.images import ImageRejected, needs_review, prepare_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def collect_images(paths: Iterable[Path]) -> list[Path]:
    """Files as given (any suffix: the content decides), and image files found under folders."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def predict_files(
    classifier, files: Sequence[Path], review_threshold: float, batch_size: int = 32, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """One row per file: label, confidence, a probability per class, needs_review, cell_in_view,
    or error."""
    classes = list(classifier.classes)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        prepared, chunk_rows = [], []
        for path in chunk:
            row: dict[str, Any] = {"file": str(path)}
            try:
                prepared.append((row, prepare_image(path.read_bytes(), classifier.config.image_size)))
            except ImageRejected as error:
                row["error"] = f"{error.code}: {error.message}"
            except OSError as error:
                row["error"] = f"unreadable: {error}"
            chunk_rows.append(row)
        if prepared:
            answers = run_model(classifier, [p for _, p in prepared])
            labels = answers.labels(classes)
            for (row, image), probs, label, score in zip(
                prepared, answers.probabilities, labels, answers.open_set_scores
            ):
                confidence = float(probs.max())
                row.update(
                    label=label,
                    confidence=round(confidence, 4),
                    open_set_score=None if score != score else round(float(score), 2),  # NaN: no open set
                    needs_review=label == UNKNOWN or needs_review(confidence, review_threshold, image.cell_in_view),
                    cell_in_view=image.cell_in_view,
                    **{f"p_{c}": round(float(p), 4) for c, p in zip(classes, probs)},
                )
        rows.extend(chunk_rows)
        if progress:
            progress("predicting", len(rows), len(files))
    return rows


def write_results(rows: list[dict[str, Any]], out: Path, classes: Sequence[str]) -> None:
    """CSV (one column per class probability) or JSON, by the file's suffix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=2))
        return
    columns = [
        "file",
        "label",
        "confidence",
        *(f"p_{c}" for c in classes),
        "open_set_score",
        "needs_review",
        "cell_in_view",
        "error",
    ]
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
