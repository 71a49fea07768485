"""Benchmark of recipes by cross-validation over TRAIN's cells (``hematovision cv``; TEST never read).

    uv run --frozen python benchmarks/cv.py --recipes default,OTHER [--folds 5] [--seed S] [--profile quick] [--parallel N]

Runs the cross-validation flow (``flows/cv.py``: grouped k-fold over the prepared manifest's TRAIN
cells, each recipe on the same folds, one MLflow parent run) and appends a dated section to
benchmarks/RESULTS.md: the comparison table (mean [95% interval] per metric, seconds per fold,
answers per second per core), the paired differences to the first recipe, and each fold's figures.
Needs the prepared manifest (``hematovision prepare``). A full-size run trains k models per recipe
(~20 min each on 2 CPU cores); ``--profile quick`` is a smoke run of the machinery, labelled as such,
and no evidence for choosing a recipe.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import machine, record  # benchmarks/training.py; it switches the tools' telemetry off


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="default", help="comma-separated: 'default' or profiles of params.yaml")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--profile", default=None, help="base profile under every recipe ('quick': a smoke run)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args()

    from flows.cv import run_cv
    from hematovision.training import cv

    recipes = cv.parse_recipes(args.recipes)
    # The code that ran is the code at the start (commits may land while it runs).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.split("\n")
    changed = [line[3:] for line in changed if line.strip()]
    if changed:
        commit += f" (uncommitted changes in the shared checkout: {', '.join(changed)})"

    started = time.perf_counter()
    result = run_cv(recipes, args.folds, args.seed, args.params, args.profile, args.parallel)
    wall = time.perf_counter() - started
    summary = result["summary"]

    lines = [f"\n## Cross-validation of recipes — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"]
    if args.profile == "quick":
        lines.append(
            "**Smoke run on the `quick` profile** (`benchmarks/cv.py --profile quick`): it shows "
            "that the machinery works; its figures are NOT evidence for choosing a recipe."
        )
    elif args.profile:
        lines.append(
            f"**Reduced budget: every recipe on the `{args.profile}` profile** (see params.yaml): the recipes are "
            "ranked against each other at that budget, paired on the same folds; the figures are not what a "
            "recipe reaches at the full budget."
        )
    if any("site_accuracy" in s for s in summary["by_recipe"].values()):
        lines.append(
            f"- site_*: the second laboratory (pbc-sample, {cv.SITE_IMAGES_PER_CLASS} images of each of the four "
            "classes, distinct cells), answered by every fold's model before any correction; site_min_f1 is the "
            "weakest class's F1. This site informs the choice of recipe: it is no longer an independent test."
        )
    lines += [
        f"- machine: {machine()}",
        f"- commit: {commit}",
        f"- command: `uv run --frozen python benchmarks/cv.py --recipes {','.join(recipes)} --folds {args.folds}"
        + (f" --seed {args.seed}" if args.seed is not None else "")
        + (f" --profile {args.profile}" if args.profile else "")
        + (f" --parallel {args.parallel}" if args.parallel != 1 else "")
        + "`",
        f"- {summary['folds']} folds of whole cells of TRAIN (seed {summary['seed']}; rows per fold "
        f"{result['rows_per_fold']}), TEST never read; each fold trained with its own grouped inner "
        "validation split and answered as the service answers (test-time views, temperature, open set); "
        f"MLflow parent run {result['parent_run_id']}; wall time {wall / 60:.1f} min",
        f"- mean over the folds [{summary['confidence']:.0%} t-interval, variance corrected for the folds' "
        "overlapping training sets (Nadeau-Bengio)]; answers/s/core: held-out images answered per second "
        "(locating the cell, every view) divided by the machine's cores",
        "",
        summary["table"],
        "",
        "Per fold (held-out accuracy, macro-F1, cells, images; seconds):",
    ]
    for recipe, folds in result["folds"].items():
        lines.append(
            f"- {recipe}: "
            + "; ".join(
                f"fold {f['fold']} {f['metrics']['accuracy']:.3f} / {f['metrics']['macro_f1']:.3f}, "
                + (f"site {f['site_metrics']['accuracy']:.3f}, " if f.get("site_metrics") else "")
                + f"{len(f['held_out_cells'])} cells, {f['n_held_out_images']} images, {f['timings']['fold_s']:.0f} s"
                for f in folds
            )
        )
    record(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
