"""Scan, validate and split image datasets into a manifest.

Two layouts are understood: the Kaggle "Blood Cell Images" download (``dataset2-master/images/
{TRAIN,TEST,TEST_SIMPLE}/{CLASS}/_<k>_<n>.jpeg``, where ``k`` is said to identify the original
cell) and any folder of class-named subfolders (a new site's export). Validation and splitting are
by *cell* (group), never by file: the augmented copies of one cell must stay on one side of a split.
The file names' ``k`` is kept as ``name_group``; ``group`` is the cell found by content when the
caller passes an embedding function (see cells.py for why the names cannot be trusted).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from hematovision import CLASSES
from hematovision.data.cells import group_by_content
from hematovision.data.imaging import ImageError, load_rgb

# Embeddings (one row each) of the images at these paths: how prepare() finds cells by content.
Embedder = Callable[[list[Path]], np.ndarray]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
KAGGLE_SPLITS = {"TRAIN": "train", "TEST": "test", "TEST_SIMPLE": "test_simple"}
# Augmented Kaggle files are "_<cell index>_<random>.<ext>".
_KAGGLE_NAME = re.compile(r"^_(\d+)_(\d+)$")

MANIFEST_COLUMNS = ["path", "split", "label", "group", "name_group", "width", "height"]
BAD_COLUMNS = ["path", "split", "label", "group", "error_code", "error_message"]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _kaggle_images_dir(root: Path) -> Path | None:
    """The folder holding TRAIN/TEST/..., whether ``root`` is the download, dataset2-master or images."""
    for cand in (root / "dataset2-master" / "images", root / "images", root):
        if cand.is_dir() and any((cand / s).is_dir() for s in KAGGLE_SPLITS):
            return cand
    return None


def is_kaggle_layout(root: Path) -> bool:
    return _kaggle_images_dir(Path(root)) is not None


def scan_kaggle(root: Path) -> pd.DataFrame:
    """List the Kaggle layout under ``root``: path (relative to root), split, label, group.

    ``group`` is ``"<SPLIT>/<CLASS>/<k>"``. A file whose name does not follow ``_<k>_<n>`` gets a
    group of its own (``"<SPLIT>/<CLASS>/file:<stem>"``): it cannot be tied to other augmentations,
    which is logged because it may leak if it is in fact one of them.
    """
    root = Path(root)
    images = _kaggle_images_dir(root)
    if images is None:
        raise FileNotFoundError(f"no Kaggle TRAIN/TEST folders under {root}")
    class_by_upper = {c.upper(): c for c in CLASSES}
    rows: list[dict] = []
    unmatched = 0
    for split_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        split = KAGGLE_SPLITS.get(split_dir.name.upper())
        if split is None:
            log.warning("ignoring unknown split folder %s", split_dir)
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            label = class_by_upper.get(class_dir.name.upper())
            if label is None:
                log.warning("ignoring unknown class folder %s", class_dir)
                continue
            prefix = f"{split_dir.name.upper()}/{label.upper()}"
            for f in sorted(class_dir.iterdir()):
                if not _is_image(f):
                    continue
                m = _KAGGLE_NAME.match(f.stem)
                if m:
                    group = f"{prefix}/{int(m.group(1))}"
                else:
                    group = f"{prefix}/file:{f.stem}"
                    unmatched += 1
                rows.append({"path": f.relative_to(root).as_posix(), "split": split, "label": label, "group": group})
    if unmatched:
        log.warning("%d files do not match _<k>_<n>; each is its own group", unmatched)
    return pd.DataFrame(rows, columns=["path", "split", "label", "group"])


def scan_class_folders(root: Path, classes: tuple[str, ...] | list[str] = CLASSES) -> tuple[pd.DataFrame, list[str]]:
    """List images in class-named subfolders of ``root`` (names case-insensitive, nested files ok).

    Returns (rows with path relative to root, label, group) and the names of subfolders that are
    not a known class (reported, not fatal). Files are assumed to be distinct cells, so each is
    its own group ``"<label>/<relative path without extension>"``.
    """
    root = Path(root)
    by_lower = {c.lower(): c for c in classes}
    rows: list[dict] = []
    unknown: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = by_lower.get(sub.name.lower())
        if label is None:
            unknown.append(sub.name)
            continue
        for f in sorted(sub.rglob("*")):
            if _is_image(f):
                rel = f.relative_to(root)
                rows.append(
                    {
                        "path": rel.as_posix(),
                        "label": label,
                        "group": f"{label}/{f.relative_to(sub).with_suffix('').as_posix()}",
                    }
                )
    return pd.DataFrame(rows, columns=["path", "label", "group"]), unknown


def _check_one(path: Path) -> tuple[int, int, str | None, str | None]:
    try:
        im = load_rgb(path)
    except ImageError as exc:
        return 0, 0, exc.code, exc.message
    except Exception as exc:  # noqa: BLE001 - one pathological file must not stop a 12k-file scan
        return 0, 0, "error", f"{type(exc).__name__}: {exc}"
    return im.width, im.height, None, None


def validate_images(df: pd.DataFrame, root: Path, workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode every file with :func:`load_rgb`; split rows into (ok + width/height, bad + error).

    Threads suffice: PIL releases the GIL while decoding.
    """
    root = Path(root)
    workers = workers or min(4, (os.cpu_count() or 1) + 1)
    paths = [root / p for p in df["path"]]
    if workers > 1 and len(paths) > 16:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_check_one, paths))
    else:
        results = [_check_one(p) for p in paths]
    res = pd.DataFrame(results, columns=["width", "height", "error_code", "error_message"], index=df.index)
    bad_mask = res["error_code"].notna()
    ok = df.loc[~bad_mask].copy()
    ok["width"] = res.loc[~bad_mask, "width"].astype(int)
    ok["height"] = res.loc[~bad_mask, "height"].astype(int)
    bad = df.loc[bad_mask].copy()
    bad["error_code"] = res.loc[bad_mask, "error_code"]
    bad["error_message"] = res.loc[bad_mask, "error_message"]
    return ok, bad


def grouped_split(df: pd.DataFrame, val_fraction: float, seed: int, *, min_val_groups: int = 2) -> pd.Series:
    """Assign each training row to "train" or "val", whole groups at a time, per class.

    Uses the rows whose ``split`` is "train" (all rows if there is no split column). Within each
    class the sorted groups are shuffled with a seeded generator and taken in that order until val
    holds ``val_fraction`` of the class's images; a group that would overshoot that by half is
    passed over (groups found by content vary in size, and one large group must not make val a
    third of the class). At least ``min_val_groups`` go to val (the smallest left, if every group
    is too large) and at least one stays in train, so every class is validated even when it has
    only a handful of cells (16 monocytes).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rows = df[df["split"] == "train"] if "split" in df.columns else df
    out = pd.Series("train", index=rows.index, name="split", dtype=object)
    if val_fraction == 0.0 or rows.empty:
        return out
    # A group's class is its majority label (groups from scan_kaggle never mix labels).
    group_label = rows.groupby("group")["label"].agg(lambda s: s.mode().iloc[0])
    group_size = rows.groupby("group").size()
    val_groups: set[str] = set()
    for i, label in enumerate(sorted(group_label.unique())):
        groups = np.array(sorted(group_label.index[group_label == label]))
        if len(groups) < 2:
            raise ValueError(f"class {label!r} has {len(groups)} group(s); need 2 to validate on it")
        target = val_fraction * group_size[groups].sum()
        most = len(groups) - 1
        chosen, images = [], 0
        # One generator per class, so adding a class does not reshuffle the others.
        for group in np.random.default_rng([seed, i]).permutation(groups):
            if len(chosen) == most or (len(chosen) >= min_val_groups and images >= target):
                break
            if images + group_size[group] <= 1.5 * target:
                chosen.append(group)
                images += group_size[group]
        # A class of a few large cells: validate on its smallest ones rather than not at all.
        for group in sorted(set(groups) - set(chosen), key=lambda g: (group_size[g], g)):
            if len(chosen) >= min(min_val_groups, most):
                break
            chosen.append(group)
        val_groups.update(chosen)
    out[rows["group"].isin(val_groups)] = "val"
    return out


def _nested(counts: pd.Series) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (split, label), v in counts.items():
        out.setdefault(str(split), {})[str(label)] = int(v)
    return out


def _counts(df: pd.DataFrame) -> dict:
    """Images and distinct groups (cells) per split and class."""
    by = df.groupby(["split", "label"])
    return {"images": _nested(by.size()), "groups": _nested(by["group"].nunique())}


def prepare(
    source: Path,
    out_dir: Path,
    val_fraction: float,
    seed: int,
    embed: Embedder | None = None,
    cell_max_distance: float = 0.25,
) -> dict:
    """Scan ``source``, validate every image, split train/val by group and write the outputs.

    With ``embed``, each image's group is the cell found by clustering the embeddings of its crop
    (cells.py); without it, the file name's group. Writes ``manifest.csv`` (path relative to
    source, split, label, group, name_group, width, height), ``bad_images.csv`` (always, header
    even when empty) and ``summary.json``; returns the summary. A class-folder source (no Kaggle
    layout) is treated as all-training data.
    """
    source, out_dir = Path(source), Path(out_dir)
    unknown: list[str] = []
    if is_kaggle_layout(source):
        layout = "kaggle"
        scanned = scan_kaggle(source)
    else:
        layout = "class_folders"
        scanned, unknown = scan_class_folders(source)
        scanned.insert(1, "split", "train")
    if scanned.empty:
        raise FileNotFoundError(f"no images found under {source}")

    ok, bad = validate_images(scanned, source)
    ok = ok.sort_values(["split", "label", "path"])
    ok["name_group"] = ok["group"]
    if embed is not None and not ok.empty:
        ok["group"] = group_by_content(ok, embed([source / p for p in ok["path"]]), cell_max_distance)
    split = grouped_split(ok, val_fraction, seed)
    ok.loc[split.index, "split"] = split
    manifest = ok[MANIFEST_COLUMNS].sort_values(["split", "label", "path"]).reset_index(drop=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    bad.reindex(columns=BAD_COLUMNS).sort_values("path").to_csv(out_dir / "bad_images.csv", index=False)

    summary = {
        "source": str(source),
        "layout": layout,
        "val_fraction": val_fraction,
        "seed": seed,
        "cell_groups": "content" if embed is not None else "file names",
        "n_scanned": int(len(scanned)),
        "n_images": int(len(manifest)),
        "n_bad": int(len(bad)),
        "bad_by_code": {k: int(v) for k, v in bad["error_code"].value_counts().items()},
        "unknown_folders": unknown,
        **_counts(manifest),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def label_indices(labels: pd.Series, classes: list[str] | tuple[str, ...] = CLASSES) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(classes)}
    return labels.map(lookup).to_numpy(dtype=int)


def limit_per_cell(rows: pd.DataFrame, max_per_cell: int, seed: int) -> pd.DataFrame:
    """At most ``max_per_cell`` augmented copies of each original cell (0 keeps all)."""
    if max_per_cell <= 0:
        return rows
    return rows.groupby("group", group_keys=False).apply(
        lambda g: g.sample(min(len(g), max_per_cell), random_state=seed)
    )
