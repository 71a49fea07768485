"""Benchmark of the promotion gate against noise: how often it promotes one run of a recipe over
another run of the same recipe, and whether it still promotes a genuinely better model.

    uv run --frozen python benchmarks/gate_noise.py [--runs 21] [--small-runs 5] [--small-fraction 0.1]

Full training takes ~20 min on 2 cores, too slow for dozens of runs, so the runs here are the main
job's first phase alone (the *head-only recipe*): a new head (``train.head_*`` parameters, early
stopping on validation loss, as ``training/train.py`` phase 1) on the frozen ImageNet backbone's
cached embeddings of the prepared TRAIN split, one run per seed (seeds 0, 1, ...). Each run answers
the validation split (one view: the frozen backbone's other test-time views are not cached) and TEST.

* same recipe: every ordered pair of runs (champion, challenger) goes through the old gate (the
  challenger's validation macro-F1 above the champion's, no class losing more than the per-class
  tolerance) and through the paired gate of ``registry/gate.py`` with ``params.yaml``'s promote
  section; disjoint pairs (run 2k vs 2k+1) are counted too. Target: the paired gate promotes at
  most 1 in 20.
* TEST as a guard: the paired interval of TEST accuracy between runs of one recipe, and how often the
  retraining guard passes at several margins (equal models should pass it).
* a genuinely better model: a head on all TRAIN cells (the same-recipe runs) against a head on a
  small share of them (``--small-fraction`` of each class's cells), both ways round.

Needs the prepared manifest (``prepared/``) and the embedding cache (``.cache/embeddings``) of the
main job; appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import machine, record  # benchmarks/training.py; it switches the tools' telemetry off

from hematovision import CLASSES, stores
from hematovision.data.dataset import label_indices, limit_per_cell
from hematovision.params import load_params
from hematovision.registry.gate import gate
from hematovision.registry.paired import answers_frame, pair_answers, paired_difference
from hematovision.settings import get_settings
from hematovision.training.metrics import classification_metrics
from hematovision.training.steps import load_manifest, official_test_rows

MARGINS = (0.01, 0.03, 0.05)


def old_gate(champion: dict, challenger: dict, tolerance: float) -> bool:
    """The gate before the paired one: the challenger's figure above the champion's, per class no
    F1 drop beyond the tolerance (both scored on the same validation split)."""
    if challenger["macro_f1"] - champion["macro_f1"] <= 0.0:
        return False
    return all(
        champion["per_class"][c]["f1"] - challenger["per_class"][c]["f1"] <= tolerance for c in champion["per_class"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=21, help="runs of the same recipe (seeds 0..runs-1)")
    parser.add_argument("--small-runs", type=int, default=5, help="heads trained on a share of the cells, per share")
    parser.add_argument(
        "--small-fractions", type=float, nargs="+", default=[0.1, 0.3], help="shares of each class's TRAIN cells"
    )
    parser.add_argument("--no-record", action="store_true", help="print only (a trial run)")
    args = parser.parse_args()

    import keras

    from hematovision.model.classifier import Classifier, ClassifierConfig
    from hematovision.model.embeddings import cached_embeddings

    started = time.perf_counter()
    settings = get_settings()
    params = load_params(settings.path(Path("params.yaml")))
    policy = params.promote
    manifest = load_manifest(settings)
    data = settings.path(settings.paths.data_dir)
    rows = {
        "train": limit_per_cell(manifest[manifest.split == "train"], params.train.max_images_per_cell, params.seed),
        "val": limit_per_cell(manifest[manifest.split == "val"], params.train.max_images_per_cell, params.seed),
        "test": official_test_rows(manifest, params),
    }
    classes = list(CLASSES)
    classifier = Classifier.new(
        ClassifierConfig(classes=classes, image_size=params.model.image_size, dropout=params.model.dropout)
    )
    with stores.embedding_cache(settings) as cache:
        embeddings = {k: cached_embeddings(classifier, [data / p for p in r.path], cache) for k, r in rows.items()}
    labels = {k: label_indices(r.label, classes) for k, r in rows.items()}
    embed_s = time.perf_counter() - started

    def run(seed: int, keep: np.ndarray | None = None) -> dict:
        """One head-only run: the answers on validation and TEST, and the validation metrics."""
        keras.utils.set_random_seed(seed)
        head = keras.models.clone_model(classifier.head)  # fresh weights, drawn under this seed
        head.compile(
            optimizer=keras.optimizers.Adam(params.train.head_learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        x, y = embeddings["train"], labels["train"]
        if keep is not None:
            x, y = x[keep], y[keep]
        head.fit(
            x,
            y,
            validation_data=(embeddings["val"], labels["val"]),
            epochs=params.train.head_epochs,
            batch_size=params.train.batch_size,
            shuffle=True,
            verbose=0,
            callbacks=[keras.callbacks.EarlyStopping("val_loss", patience=5, restore_best_weights=True)],
        )
        out = {"seed": seed}
        for split in ("val", "test"):
            probabilities = head.predict(embeddings[split], batch_size=1024, verbose=0)
            out[split] = answers_frame(rows[split], [classes[i] for i in probabilities.argmax(axis=1)])
            out[f"{split}_metrics"] = classification_metrics(labels[split], probabilities, classes)
        return out

    started = time.perf_counter()
    runs = [run(seed) for seed in range(args.runs)]
    smalls = {}
    for fraction in args.small_fractions:
        rng = np.random.default_rng(params.seed)
        cells = set()
        for of_class in rows["train"].groupby("label").group.unique():
            cells |= set(rng.choice(of_class, max(1, round(fraction * len(of_class))), replace=False))
        keep = rows["train"].group.isin(cells).to_numpy()
        smalls[fraction] = {
            "images": int(keep.sum()),
            "cells": len(cells),
            "runs": [run(1000 + seed, keep) for seed in range(args.small_runs)],
        }
    train_s = time.perf_counter() - started

    def decide(champion: dict, challenger: dict) -> tuple[bool, bool, object]:
        new = gate(
            {},
            {},
            policy,
            paired={"val": pair_answers(champion["val"], challenger["val"])},
            classes=(classes, classes),
        )
        old = old_gate(champion["val_metrics"], challenger["val_metrics"], policy.per_class_tolerance)
        return old, new.passed, new.intervals["val_macro_f1"]

    started = time.perf_counter()
    ordered = [(a, b, *decide(runs[a], runs[b])) for a, b in itertools.permutations(range(len(runs)), 2)]
    disjoint = [o for o in ordered if o[0] % 2 == 0 and o[1] == o[0] + 1]
    guard_lows = [
        paired_difference(
            pair_answers(runs[a]["test"], runs[b]["test"]),
            "test_accuracy",
            classes,
            policy.bootstrap_samples,
            policy.confidence,
            policy.bootstrap_seed,
        ).low
        for a, b in itertools.permutations(range(len(runs)), 2)
    ]
    for small in smalls.values():
        small["better"] = [decide(s, runs[k]) for k, s in enumerate(small["runs"])]
        small["worse"] = [decide(runs[k], s) for k, s in enumerate(small["runs"])]
    gate_s = time.perf_counter() - started

    val_f1 = np.array([r["val_metrics"]["macro_f1"] for r in runs])
    val_acc = np.array([r["val_metrics"]["accuracy"] for r in runs])
    test_acc = np.array([r["test_metrics"]["accuracy"] for r in runs])
    widths = np.array([o[4].high - o[4].low for o in ordered])
    spread = max(abs(o[4].difference) for o in ordered)

    def rate(items, index) -> str:
        hits = sum(1 for o in items if o[index])
        return f"{hits}/{len(items)} ({hits / len(items):.1%})"

    n_val = rows["val"].group.nunique()
    n_test = rows["test"].group.nunique()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
    lines = [
        f"\n## Promotion gate against noise — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit or 'unknown'}{' (uncommitted changes under src/)' if dirty.strip() else ''}; "
        f"gate: promote.metric {policy.metric}, {policy.bootstrap_samples} resamples of cells, "
        f"{policy.confidence:.0%} interval, lower bound > {policy.min_improvement}, per-class tolerance "
        f"{policy.per_class_tolerance}, min shared cells {policy.min_shared_cells}, seed {policy.bootstrap_seed}",
        f"- recipe of the pairs: head-only (the main job's phase 1 alone): a new head (dropout "
        f"{params.model.dropout}, softmax) on the frozen ImageNet EfficientNet-Lite0's cached "
        f"{params.model.image_size} px embeddings of the prepared TRAIN split ({len(rows['train'])} images, "
        f"{rows['train'].group.nunique()} cells), Adam {params.train.head_learning_rate}, up to "
        f"{params.train.head_epochs} epochs, batch {params.train.batch_size}, early stopping on validation loss "
        f"(patience 5); {args.runs} runs with seeds 0-{args.runs - 1} (Keras seed: initial weights, dropout, "
        f"shuffling); answers with one view (no test-time views); validation {len(rows['val'])} images of "
        f"{n_val} cells, TEST {len(rows['test'])} images of {n_test} groups",
        f"- the runs: validation macro-F1 {val_f1.mean():.3f} (min {val_f1.min():.3f}, max {val_f1.max():.3f}), "
        f"accuracy {val_acc.min():.3f}-{val_acc.max():.3f}; TEST accuracy {test_acc.min():.3f}-{test_acc.max():.3f}; "
        f"largest macro-F1 difference between two runs {spread:.3f}; paired {policy.confidence:.0%} interval "
        f"width {np.median(widths):.3f} (median)",
        "",
        "| pairs of runs of one recipe | old gate promotes | paired gate promotes | target |",
        "|---|---|---|---|",
        f"| every ordered pair ({len(ordered)}) | {rate(ordered, 2)} | {rate(ordered, 3)} | at most 1 in 20 |",
        f"| disjoint pairs, run 2k+1 over 2k ({len(disjoint)}) | {rate(disjoint, 2)} | {rate(disjoint, 3)} "
        "| at most 1 in 20 |",
        "",
        f"Genuinely better: a head on every TRAIN cell (the runs above, seeds 0-{args.small_runs - 1}) as the "
        f"challenger against a head on a share of each class's TRAIN cells (seeds 1000-{999 + args.small_runs}) as "
        "the champion, and the other way round:",
        "",
        "| champion: head on | its validation macro-F1 | full head promoted over it | it promoted over the full head "
        "| the full head's gain, paired intervals |",
        "|---|---|---|---|---|",
        *(
            f"| {fraction:.0%} of the cells ({small['images']} images, {small['cells']} cells) "
            f"| {np.mean([r['val_metrics']['macro_f1'] for r in small['runs']]):.3f} "
            f"| {rate(small['better'], 1)} | {rate(small['worse'], 1)} | "
            + ", ".join(f"{b[2].difference:+.3f} [{b[2].low:+.3f}, {b[2].high:+.3f}]" for b in small["better"])
            + " |"
            for fraction, small in smalls.items()
        ),
        "",
        f"TEST as a guard (retraining's, accuracy): between runs of one recipe the paired {policy.confidence:.0%} "
        f"interval's lower bound is {np.median(guard_lows):+.3f} (median), {np.percentile(guard_lows, 5):+.3f} "
        f"(5th percentile); equal models pass the guard at margin "
        + ", ".join(f"{m}: {np.mean(np.array(guard_lows) > -m):.0%}" for m in MARGINS)
        + f" (retrain.guard_tolerance is {params.retrain.guard_tolerance}).",
        "",
        f"Times: embeddings from the cache {embed_s:.0f} s, {args.runs + args.small_runs * len(smalls)} head runs {train_s:.0f} s, "
        f"{len(ordered) + 2 * args.small_runs * len(smalls)} gate decisions and {len(guard_lows)} guard intervals {gate_s:.0f} s.",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record(lines)


if __name__ == "__main__":
    main()
