"""How many real cells do TRAIN and TEST hold? Each augmented image matched to its original smear field.

    uv run --frozen python benchmarks/dataset_cells.py [--views 4]

The datasets README says the ``_<k>_`` in a file name is the index of the original cell. Looking at
TEST's errors suggested otherwise (one cell under several indices, several cells under one index),
so this measures it: every augmented image of ``dataset2-master/images/{TRAIN,TEST}`` is matched
to the nearest of the 367 original 640x480 fields in ``dataset-master/JPEGImages`` (whole frames
resized to 160x160, ImageNet EfficientNet-Lite0 embeddings averaged over dihedral views, cosine
similarity). The match is checked against ``dataset-master/labels.csv``: the matched original's
label should be the image's class. Appends a section to benchmarks/RESULTS.md.

A match is a nearest neighbour, not a proof: an augmented copy is rotated by any angle and shifted,
so the figures are counts of originals that account for a real share of a class (>= 5% of its
images), not exact cell counts.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import machine, record  # noqa: E402

from hematovision.settings import get_settings, quiet_environment  # noqa: E402

quiet_environment()

SIZE = 160
SHARE = 0.05  # an original "counts" for a class when it accounts for at least this share of its images


def embed_frames(classifier, paths: list[Path], views: int) -> np.ndarray:
    """Rotation-averaged, unit-length embeddings of whole frames."""
    from PIL import Image

    from hematovision.model import dihedral_views

    out = []
    for start in range(0, len(paths), 256):
        frames = np.stack([np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
                           for p in paths[start:start + 256]])
        emb = np.mean([classifier.embed(v) for v in dihedral_views(frames, views)], axis=0)
        out.append(emb / np.linalg.norm(emb, axis=1, keepdims=True))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=4, choices=(1, 2, 4, 8), help="dihedral views averaged")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import pandas as pd

    from hematovision.model import Classifier, ClassifierConfig

    root = get_settings().path(get_settings().data_source)
    originals = sorted((root / "dataset-master" / "JPEGImages").glob("*.jpg"))
    labels = pd.read_csv(root / "dataset-master" / "labels.csv")
    label_of = {f"BloodImage_{int(i):05d}": str(c).strip().lower() for i, c in zip(labels.Image, labels.Category)
                if isinstance(c, str) and "," not in c}
    started = time.perf_counter()
    classifier = Classifier.new(ClassifierConfig(image_size=SIZE))  # ImageNet weights, nothing fine-tuned
    reference = embed_frames(classifier, originals, args.views)
    names = [p.stem for p in originals]

    rows = []
    for split in ("TRAIN", "TEST"):
        for folder in sorted((root / "dataset2-master" / "images" / split).iterdir()):
            paths = sorted(folder.glob("*.jpeg"))
            similarity = embed_frames(classifier, paths, args.views) @ reference.T
            best = similarity.argmax(axis=1)
            top_two = np.sort(similarity, axis=1)[:, -2:]
            for path, b, (second, first) in zip(paths, best, top_two):
                group = re.match(r"_(\d+)_", path.name)
                rows.append({"split": split, "cls": folder.name.lower(), "group": group.group(1) if group else "?",
                             "original": names[b], "similarity": first, "margin": first - second})
            print(f"{split}/{folder.name}: {len(paths)} images matched", flush=True)
    df = pd.DataFrame(rows)
    elapsed = time.perf_counter() - started

    df["label_agrees"] = [label_of.get(o) == c if o in label_of else np.nan for o, c in zip(df.original, df.cls)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"\n## Real cells in TRAIN and TEST (augmented images matched to original fields) — "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {machine()}", f"- commit: {commit}; `benchmarks/dataset_cells.py --views {args.views}`; "
             f"{len(df)} images against {len(originals)} originals in {elapsed / 60:.1f} min",
             f"- match quality: median cosine similarity {df.similarity.median():.3f}, median margin to the second-best "
             f"original {df.margin.median():.3f}; the matched original's label (labels.csv) is the image's class for "
             f"{df.label_agrees.dropna().mean():.1%} of the {int(df.label_agrees.notna().sum())} images whose original has one label",
             "",
             "| split | class | images | `_k_` groups | originals with >= 5% of the class | their share of the class | "
             "originals per `_k_` group (median, >= 5% of the group) |",
             "|---|---|---|---|---|---|---|"]
    for (split, cls), g in df.groupby(["split", "cls"], sort=False):
        counts = g.original.value_counts()
        major = counts[counts >= SHARE * len(g)]
        per_group = [int((c >= SHARE * c.sum()).sum()) for _, c in
                     ((k, sub.original.value_counts()) for k, sub in g.groupby("group"))]
        lines.append(f"| {split} | {cls} | {len(g)} | {g.group.nunique()} | {len(major)} | "
                     f"{major.sum() / len(g):.0%} | {np.median(per_group):.0f} |")
    shared = []
    for cls, g in df.groupby("cls"):
        majors = {s: set(c[c >= SHARE * c.sum()].index) for s, c in
                  ((s, sub.original.value_counts()) for s, sub in g.groupby("split"))}
        both = majors.get("TRAIN", set()) & majors.get("TEST", set())
        if both:
            shared.append(f"{cls}: {', '.join(sorted(both))}")
    lines.append("")
    lines.append("Originals that are major sources of the same class in both TRAIN and TEST: "
                 + ("; ".join(shared) if shared else "none"))
    test_major = {cls: c[c >= SHARE * c.sum()] for cls, c in
                  ((cls, sub.original.value_counts()) for cls, sub in df[df.split == "TEST"].groupby("cls"))}
    lines.append("TEST's major originals per class: " + "; ".join(
        f"{cls} " + ", ".join(f"{o} {n}" for o, n in c.items()) for cls, c in test_major.items()))
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record(lines)


if __name__ == "__main__":
    main()
