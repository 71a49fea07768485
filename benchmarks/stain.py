"""Screen of the stain normalisations (data/stain.py) on frozen ImageNet features: which are worth a
cross-validated fine-tuning run (benchmarks/cv.py), at a few minutes each.

    uv run --frozen python benchmarks/stain.py [--per-cell 3] [--site-per-class 120] [--size 192]

For every method: the pretrained backbone (not fine-tuned) embeds crops normalised by it, a logistic
regression is fitted on the prepared manifest's TRAIN cells (``split`` train, at most ``--per-cell``
copies of a cell) and answers the validation cells (``split`` val: whole cells held out) and a
sample of the second laboratory (``paths.new_site_source``, four classes, distinct cells). Accuracy
with a 95% bootstrap interval (cells resampled), and the second site's per-class F1. A frozen
backbone reads both laboratories far worse than a fine-tuned one: the figures rank normalisations,
they are not what a trained model reaches. TEST is never read. Appends a dated section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import code_version, machine, record  # benchmarks/training.py; it switches telemetry off


def bootstrap_accuracy(correct: np.ndarray, groups: np.ndarray, samples: int = 1000, seed: int = 0):
    """Accuracy and its 95% interval, whole groups (cells) resampled."""
    frame = pd.DataFrame({"correct": correct, "group": groups}).groupby("group")["correct"].agg(["sum", "count"])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(frame), (samples, len(frame)))
    sums, counts = frame["sum"].to_numpy()[picks].sum(1), frame["count"].to_numpy()[picks].sum(1)
    low, high = np.quantile(sums / counts, [0.025, 0.975])
    return float(correct.mean()), float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-cell", type=int, default=3)
    parser.add_argument("--site-per-class", type=int, default=120)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from hematovision import CLASSES
    from hematovision.data import stain
    from hematovision.data.dataset import limit_per_cell, scan_class_folders
    from hematovision.model.classifier import Classifier, ClassifierConfig, read_crops
    from hematovision.settings import get_settings
    from hematovision.training.steps import load_manifest

    commit = code_version()
    settings = get_settings()
    manifest = load_manifest(settings)
    data_dir = settings.path(settings.paths.data_dir)
    train = limit_per_cell(manifest[manifest.split == "train"], args.per_cell, 0)
    val = limit_per_cell(manifest[manifest.split == "val"], args.per_cell, 0)
    site_root = settings.path(settings.paths.new_site_source)
    site, _ = scan_class_folders(site_root, CLASSES)
    site = site.groupby("label", group_keys=False)[["path", "label"]].apply(
        lambda g: g.sample(min(len(g), args.site_per_class), random_state=0)
    )
    site["group"] = site.path  # the second laboratory's images are distinct cells

    started = time.perf_counter()
    crops = {
        "train": read_crops([data_dir / p for p in train.path], args.size),
        "val": read_crops([data_dir / p for p in val.path], args.size),
        "site": read_crops([site_root / p for p in site.path], args.size),
    }
    crop_s = time.perf_counter() - started
    # One pretrained backbone; each method is the same network behind another normalisation.
    plain = Classifier.new(ClassifierConfig(image_size=args.size))
    methods = args.methods.split(",") if args.methods else list(stain.METHODS)
    rows = []
    for method in methods:
        started = time.perf_counter()
        classifier = Classifier(plain.keras_model, ClassifierConfig(image_size=args.size, stain=method))
        embedded = {name: classifier.embed(c) for name, c in crops.items()}
        scaler = StandardScaler().fit(embedded["train"])
        model = LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced")
        model.fit(scaler.transform(embedded["train"]), train.label)
        val_answer = model.predict(scaler.transform(embedded["val"]))
        site_answer = model.predict(scaler.transform(embedded["site"]))
        val_acc = bootstrap_accuracy(val_answer == val.label.to_numpy(), val.group.to_numpy())
        site_acc = bootstrap_accuracy(site_answer == site.label.to_numpy(), site.group.to_numpy())
        f1 = f1_score(site.label, site_answer, labels=list(CLASSES), average=None)
        rows.append((method, val_acc, site_acc, f1, time.perf_counter() - started))
        print(rows[-1], flush=True)

    def ci(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    lines = [
        f"\n## Stain normalisation screen (frozen ImageNet backbone) — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}; command: `uv run --frozen python benchmarks/stain.py --per-cell {args.per_cell} "
        f"--site-per-class {args.site_per_class} --size {args.size}`",
        f"- EfficientNet-Lite0 pretrained, not fine-tuned, {args.size} px crops; logistic regression on "
        f"{len(train)} images of {train.group.nunique()} TRAIN cells; validation {len(val)} images of "
        f"{val.group.nunique()} held-out cells; second laboratory (pbc-sample, which informs this choice) "
        f"{len(site)} images; intervals: 95% bootstrap over cells; crops made in {crop_s:.0f} s",
        "- ranks normalisations only: a frozen backbone reads both laboratories far worse than the fine-tuned model",
        "",
        "| stain | validation accuracy | second site accuracy | second site F1 "
        + "/".join(c[:2].upper() for c in CLASSES)
        + " | s |",
        "|---|---|---|---|---|",
    ]
    for method, val_acc, site_acc, f1, seconds in rows:
        lines.append(
            f"| {method} | {ci(val_acc)} | {ci(site_acc)} | {' / '.join(f'{x:.2f}' for x in f1)} | {seconds:.0f} |"
        )
    record(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
