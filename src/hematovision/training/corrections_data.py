"""Retraining's data from the pathologists' corrections: which exported images train and which
are held out to judge the new site, and which cell types become classes."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from hematovision import CLASSES
from hematovision.data.dataset import scan_class_folders
from hematovision.data.imaging import ImageError, load_rgb
from hematovision.model.embeddings import file_sha256

HOLDOUT = "holdout"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_holdout(sha256: str, fraction: float) -> bool:
    """Whether a correction image is in the new site's holdout: a fixed function of its content,
    so an image never moves between training and holdout as corrections accumulate."""
    return int(sha256[:12], 16) / float(1 << 48) < fraction


def corrections_rows(folder: Path, holdout_fraction: float, types: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Manifest rows of an exported corrections folder: absolute path, split (``train`` or
    ``holdout``), label, group (each image its own cell), source, sha256. A file that does not
    decode as training decodes it is left out and reported (the log, and ``attrs["unreadable"]``
    of the answer: relative path -> why), never fatal."""
    columns = ["path", "split", "label", "group", "source", "sha256"]
    if not folder.is_dir():
        return pd.DataFrame(columns=columns)
    rows, _ = scan_class_folders(folder, types)
    out, unreadable = [], {}
    for row in rows.itertuples():
        path = folder / row.path
        try:
            load_rgb(path)
        except ImageError as error:
            unreadable[row.path] = f"{error.code}: {error.message}"
            continue
        except Exception as error:  # noqa: BLE001 - one bad file must not stop retraining
            unreadable[row.path] = f"{type(error).__name__}: {error}"
            continue
        sha = path.stem if _SHA256.match(path.stem) else file_sha256(path)
        out.append(
            {
                "path": str(path),
                "split": HOLDOUT if is_holdout(sha, holdout_fraction) else "train",
                "label": row.label,
                "group": f"corrections/{sha}",
                "source": "corrections",
                "sha256": sha,
            }
        )
    if unreadable:
        logging.getLogger(__name__).warning(
            "%d of %d correction images left out, unreadable: %s",
            len(unreadable),
            len(rows),
            "; ".join(f"{path} ({why})" for path, why in unreadable.items()),
        )
    frame = pd.DataFrame(out, columns=columns)
    frame.attrs["unreadable"] = unreadable
    return frame


def challenger_classes(
    parent_classes: list[str], corrections: pd.DataFrame, min_corrections: int
) -> tuple[list[str], dict[str, int]]:
    """The challenger's classes: the parent's, then every type with at least ``min_corrections``
    agreed corrections (the export holds only agreed ones); and the types still waiting, with
    their counts (left out of this retraining)."""
    counts = corrections.label.value_counts()
    new = sorted(t for t, n in counts.items() if t not in parent_classes and n >= min_corrections)
    classes = [*parent_classes, *new]
    waiting = {str(t): int(n) for t, n in counts.items() if t not in classes}
    return classes, waiting
