"""Grouped k-fold cross-validation over TRAIN's cells: how recipes are compared, never on TEST.

The prepared manifest's ``train`` and ``val`` rows (the official TRAIN folder) are cut into ``k``
folds of whole *cells* (the ``group`` column: cells found by content), each class's cells spread
evenly over the folds. For fold ``i`` the other folds are the training data: they are split once
more, grouped, into train and validation (``prepare.val_fraction``) and handed to the one training
implementation (``training/train.py``), which selects its best epoch and fits the open set and the
temperature on that inner validation split, exactly as the main job does. Fold ``i`` itself is then
answered as TEST is in the main job: never seen by training, not even to choose an epoch or a
threshold. (Scoring the fold the training validated on would flatter it, and an open-set threshold
set at the 95% quantile of the very cells it is judged on would always say 5% unknown.) TEST rows
are never read.

Each recipe (a named set of parameter overrides: a profile of ``params.yaml``, or ``default``) is
run on the same folds, so recipes are compared paired, fold by fold. Per metric: the mean over the
folds and a t-interval with the Nadeau-Bengio correction (the folds' training sets overlap, so the
plain t-interval would be too narrow). ``flows/cv.py`` runs the folds as Prefect tasks; the MLflow
logging (one parent run per invocation, a child run per recipe and fold) is here.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from hematovision.data.dataset import grouped_split, limit_per_cell
from hematovision.model.embeddings import EmbeddingCache
from hematovision.params import Params, _apply, load_params
from hematovision.registry.tracking import configure_mlflow, git_commit
from hematovision.settings import Settings
from hematovision.training.evaluate import evaluate_folder, score_rows
from hematovision.training.metrics import flatten_for_mlflow

Progress = Callable[[str, int, int], None]

DEFAULT_RECIPE = "default"
CV_SPLITS = ("train", "val")  # the official TRAIN folder; "test" is never read
# Summarised per fold: (key in the fold's result, its name in the table); per-class F1 come after.
HEADLINE = ("accuracy", "macro_f1", "cell_accuracy", "ece", "unknown_rate")
# The second laboratory (paths.new_site_source), answered by every fold's model: what a recipe is
# chosen for is reading a laboratory it was not trained on. Its cells are distinct, so a sample of
# this many per class gives tight intervals at a fraction of the time of all 2,400.
SITE = ("site_accuracy", "site_macro_f1", "site_min_f1")
SITE_IMAGES_PER_CLASS = 150
COSTS = ("fold_s", "answers_per_s_per_core")
SUMMARY_ARTIFACT = "cv/summary.json"
TABLE_ARTIFACT = "cv/table.md"


# --- recipes --------------------------------------------------------------------------------------
def recipe_params(params_file: Path, recipe: str, base_profile: str | None = None) -> Params:
    """The parameters of ``recipe``: defaults, ``params_file``, the ``base_profile`` (``quick`` for a
    smoke run), then the recipe's own profile on top (``default``: nothing more)."""
    params = load_params(params_file, base_profile)
    if recipe == DEFAULT_RECIPE:
        return params
    raw = yaml.safe_load(Path(params_file).read_text()) if Path(params_file).exists() else {}
    profiles = (raw or {}).get("profiles") or {}
    if recipe not in profiles:
        known = ", ".join([DEFAULT_RECIPE, *sorted(profiles)])
        raise ValueError(f"unknown recipe {recipe!r}: a recipe is a profile of {params_file} or 'default' ({known})")
    _apply(params, profiles[recipe], "")
    return params


def parse_recipes(text: str) -> list[str]:
    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names:
        raise ValueError("name at least one recipe ('default' or a profile of params.yaml)")
    if len(set(names)) != len(names):
        raise ValueError(f"a recipe is named twice: {text}")
    return names


# --- folds ----------------------------------------------------------------------------------------
def cv_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows cross-validation may use: the official TRAIN folder's (split train or val)."""
    return manifest[manifest.split.isin(CV_SPLITS)]


def fold_assignments(manifest: pd.DataFrame, k: int, seed: int) -> pd.Series:
    """The fold (0..k-1) of every TRAIN row (splits train and val; TEST is left out), whole cells at
    a time, indexed like the manifest.

    Within each class the cells are shuffled (seeded; one generator per class) and dealt out in
    rounds of ``k``: every fold gets one cell of the class per round, the round's largest cell going
    to the fold with the fewest images of the class so far, and a last, partial round to the folds
    with the fewest cells overall. So each class's cells differ by at most one between folds, and
    so do all cells; images balance as well as the cells' sizes allow.
    """
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {k}")
    rows = cv_rows(manifest)
    if rows.empty:
        raise ValueError("the manifest has no TRAIN rows (split train or val): run `hematovision prepare` first")
    group_label = rows.groupby("group")["label"].agg(lambda s: s.mode().iloc[0])
    group_size = rows.groupby("group").size()
    if len(group_label) < k:
        raise ValueError(f"{len(group_label)} cells cannot make {k} folds: every fold needs a cell of its own")
    fold_of: dict[str, int] = {}
    cells = np.zeros(k, dtype=int)
    for i, label in enumerate(sorted(group_label.unique())):
        groups = np.array(sorted(group_label.index[group_label == label]))
        # Training inside a fold splits its cells of every class into train and validation again.
        if len(groups) - math.ceil(len(groups) / k) < 2:
            raise ValueError(
                f"class {label!r} has {len(groups)} cells: with {k} folds a fold's training data would keep "
                f"fewer than the 2 it needs to train and validate on it (use fewer folds)"
            )
        rng = np.random.default_rng([seed, i])
        order = rng.permutation(groups)
        images = np.zeros(k, dtype=int)
        for start in range(0, len(order), k):
            chunk = sorted(order[start : start + k], key=lambda g: -group_size[g])
            tie = rng.permutation(k)
            chosen = sorted(range(k), key=lambda f: (cells[f], images[f], tie[f]))[: len(chunk)]
            for group, fold in zip(chunk, sorted(chosen, key=lambda f: (images[f], tie[f]))):
                fold_of[group] = fold
                images[fold] += group_size[group]
                cells[fold] += 1
    return rows.group.map(fold_of).astype(int).rename("fold")


def fold_rows(
    manifest: pd.DataFrame, folds: pd.Series, fold: int, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold ``fold``'s training rows (``split`` train or val: the inner, grouped validation split
    that training selects and calibrates on) and its held-out rows."""
    rows = manifest.loc[folds.index]
    held_out = rows[folds == fold]
    training = rows[folds != fold].copy()
    training["split"] = "train"
    training["split"] = grouped_split(training, val_fraction, seed + fold)
    return training, held_out


# --- one fold -------------------------------------------------------------------------------------
def run_fold(
    manifest: pd.DataFrame,
    folds: pd.Series,
    fold: int,
    image_root: Path,
    params: Params,
    cache: EmbeddingCache,
    progress: Progress | None = None,
    site: Path | None = None,
) -> dict[str, Any]:
    """Train on the other folds with ``training.train.train`` and answer fold ``fold`` as the
    service answers (test-time views, temperature, open set); returns its metrics, sizes and times.
    With ``site`` (a folder of class-named subfolders from another laboratory), the fold's model
    answers a sample of it too (``site_metrics``)."""
    from hematovision.training.train import train  # heavy: imports Keras

    started = time.perf_counter()
    training, held_out = fold_rows(manifest, folds, fold, params.prepare.val_fraction, params.seed)
    result = train(training, image_root, params, cache, progress)
    train_s = time.perf_counter() - started
    # As train() validates: at most train.max_images_per_cell copies of a cell (0: all; quick runs cap it).
    held_out = limit_per_cell(held_out, params.train.max_images_per_cell, params.seed)
    report = None if progress is None else (lambda done, total: progress("answering the held-out fold", done, total))
    scoring = time.perf_counter()
    # No embedding cache: a fine-tuned backbone's embeddings are of no use to anyone afterwards, and
    # the time taken is then what an answer costs (locating the cell, every test-time view).
    metrics, _ = score_rows(
        result.classifier, held_out, image_root, None, params.evaluate.bootstrap_samples, params.seed, report
    )
    score_s = time.perf_counter() - scoring
    site_metrics = None
    if site is not None:
        site_report = (
            None if progress is None else (lambda done, total: progress("answering the second site", done, total))
        )
        site_metrics = evaluate_folder(
            result.classifier,
            site,
            None,
            params.evaluate.bootstrap_samples,
            SITE_IMAGES_PER_CLASS,
            params.seed,
            site_report,
        )
    return {
        "fold": fold,
        "metrics": metrics,
        "site_metrics": site_metrics,
        "inner_val": {key: result.val_metrics.get(key) for key in ("accuracy", "macro_f1", "cell_accuracy")},
        "n_train_images": result.n_train_images,
        "n_train_cells": result.n_train_cells,
        "n_held_out_images": int(len(held_out)),
        "held_out_cells": sorted(held_out.group.unique()),
        "timings": {**result.timings, "train_s": train_s, "score_s": score_s, "fold_s": time.perf_counter() - started},
        "cores": os.cpu_count() or 1,
        "answers_per_s_per_core": len(held_out) / max(score_s, 1e-9) / (os.cpu_count() or 1),
    }


# --- summaries ------------------------------------------------------------------------------------
def fold_values(fold: dict[str, Any]) -> dict[str, float]:
    """A fold's figures that are summarised: headline metrics, per-class F1 (only for classes the
    fold holds out cells of), wall time and answers per second per core."""
    m = fold["metrics"]
    values = {key: m[key] for key in HEADLINE if m.get(key) is not None}
    for name, scores in m.get("per_class", {}).items():
        if scores["support"] > 0:
            values[f"f1_{name}"] = scores["f1"]
    site = fold.get("site_metrics")
    if site:
        per_class = [scores["f1"] for scores in site.get("per_class", {}).values() if scores["support"] > 0]
        values.update(site_accuracy=site["accuracy"], site_macro_f1=site["macro_f1"], site_min_f1=min(per_class))
    values["fold_s"] = fold["timings"]["fold_s"]
    values["answers_per_s_per_core"] = fold["answers_per_s_per_core"]
    return {key: float(v) for key, v in values.items()}


def interval(
    values: Sequence[float],
    confidence: float = 0.95,
    k: int | None = None,
    bounds: tuple[float | None, float | None] = (None, None),
) -> dict[str, float]:
    """Mean and a t-interval over folds, the variance corrected for overlapping training sets
    (Nadeau & Bengio 2003: ``1/n + n_test/n_train``, which is ``1/(k-1)`` for k-fold), cut to the
    metric's ``bounds`` (a share is in [0, 1]); with one value the interval is unknown (nan)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    k = k or n
    out = {"mean": float(x.mean()) if n else float("nan"), "n": n}
    if n < 2:
        return {**out, "low": float("nan"), "high": float("nan"), "sd": float("nan")}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd * math.sqrt(1 / n + 1 / max(k - 1, 1))
    low, high = out["mean"] - half, out["mean"] + half
    low = low if bounds[0] is None else max(low, bounds[0])
    high = high if bounds[1] is None else min(high, bounds[1])
    return {**out, "low": low, "high": high, "sd": sd}


def summarise(folds: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """metric -> mean, low, high, sd, n over the folds (see :func:`interval`)."""
    values = [fold_values(f) for f in folds]
    keys = list(dict.fromkeys(key for v in values for key in v))
    return {key: interval([v[key] for v in values if key in v], confidence, len(folds), _bounds(key)) for key in keys}


def _bounds(metric: str) -> tuple[float | None, float | None]:
    """Every summarised metric but the costs is a share in [0, 1]; costs are not negative."""
    return (0.0, None) if metric in COSTS else (0.0, 1.0)


def paired_differences(
    baseline: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], confidence: float = 0.95
) -> dict[str, dict[str, float]]:
    """``other`` minus ``baseline`` fold by fold (the same folds), with the same interval."""
    base = {f["fold"]: fold_values(f) for f in baseline}
    mine = {f["fold"]: fold_values(f) for f in other}
    out = {}
    for key in ("accuracy", "macro_f1", "cell_accuracy", *SITE):
        diffs = [
            mine[i][key] - base[i][key] for i in sorted(base.keys() & mine.keys()) if key in base[i] and key in mine[i]
        ]
        out[key] = interval(diffs, confidence, len(base), (-1.0, 1.0))
    return out


def summary_table(summary: dict[str, Any]) -> str:
    """The comparison as markdown: recipe x metric, mean [interval]; wall time and answers/s/core."""
    recipes = summary["recipes"]
    metrics = [m for m in summary["metrics"] if m not in COSTS]
    head = ["recipe", *metrics, "s per fold", "answers/s/core"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in recipes:
        s = summary["by_recipe"][recipe]
        cells = [recipe, *(format_interval(s.get(m)) for m in metrics)]
        cells += [
            format_interval(s.get("fold_s"), "{:.0f}"),
            format_interval(s.get("answers_per_s_per_core"), "{:.1f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for recipe, diffs in summary.get("vs_first", {}).items():
        lines.append(
            f"\n{recipe} - {recipes[0]}, paired over the same folds: "
            + ", ".join(f"{m} {format_interval(d, '{:+.3f}')}" for m, d in diffs.items())
        )
    return "\n".join(lines)


def format_interval(s: dict[str, float] | None, fmt: str = "{:.3f}") -> str:
    if not s or math.isnan(s["mean"]):
        return ""
    if math.isnan(s["low"]):
        return fmt.format(s["mean"])
    return f"{fmt.format(s['mean'])} [{fmt.format(s['low'])}, {fmt.format(s['high'])}]"


def summarise_recipes(
    results: dict[str, list[dict[str, Any]]], k: int, seed: int, confidence: float = 0.95
) -> dict[str, Any]:
    """Every recipe's summary, the paired differences to the first recipe, and the metric order."""
    recipes = list(results)
    by_recipe = {recipe: summarise(folds, confidence) for recipe, folds in results.items()}
    metrics = list(dict.fromkeys(m for s in by_recipe.values() for m in s))
    ordered = [m for m in (*HEADLINE, *SITE) if m in metrics] + sorted(m for m in metrics if m.startswith("f1_"))
    summary: dict[str, Any] = {
        "recipes": recipes,
        "folds": k,
        "seed": seed,
        "confidence": confidence,
        "metrics": ordered + [m for m in COSTS if m in metrics],
        "by_recipe": by_recipe,
        "vs_first": {r: paired_differences(results[recipes[0]], results[r], confidence) for r in recipes[1:]},
    }
    summary["table"] = summary_table(summary)
    return summary


# --- MLflow ---------------------------------------------------------------------------------------
def metric_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def start_parent_run(settings: Settings, recipes: list[str], k: int, seed: int, base_profile: str | None) -> str:
    """The invocation's parent run (in the training experiment, tag ``step=cv``); returns its id."""
    import mlflow

    configure_mlflow(settings)
    experiment = mlflow.get_experiment_by_name(settings.registry.experiment_name)
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment.experiment_id,
        run_name=f"cv-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"step": "cv", "git_commit": git_commit(settings.paths.project_dir), "cv_recipes": ",".join(recipes)},
    )
    params = {"cv.folds": k, "cv.seed": seed, "cv.recipes": ",".join(recipes), "cv.base_profile": base_profile or ""}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def log_fold(parent_run_id: str, recipe: str, params: Params, result: dict[str, Any]) -> str:
    """A child run of ``parent_run_id`` for one recipe's fold: its parameters, held-out metrics
    (``heldout_*``), inner validation figures and times. Thread-safe (explicit run ids)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=f"cv-{recipe}-fold{result['fold']}",
        tags={"mlflow.parentRunId": parent_run_id, "step": "cv-fold", "cv_recipe": recipe},
    )
    now = int(time.time() * 1000)
    values = {
        **flatten_for_mlflow(result["metrics"], "heldout"),
        **(flatten_for_mlflow(result["site_metrics"], "site") if result.get("site_metrics") else {}),
        **{f"inner_val_{k}": v for k, v in result["inner_val"].items() if v is not None},
        **{f"time_{k}": v for k, v in result["timings"].items()},
        "answers_per_s_per_core": result["answers_per_s_per_core"],
        "n_train_images": result["n_train_images"],
        "n_held_out_images": result["n_held_out_images"],
    }
    flat = {**params.flat(), "cv.recipe": recipe, "cv.fold": result["fold"]}
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(key, float(v), now, 0) for key, v in values.items()],
        params=[Param(key, str(v)) for key, v in flat.items()],
        tags=[RunTag("cv_fold", str(result["fold"]))],
    )
    client.log_text(run.info.run_id, "\n".join(result["held_out_cells"]), "cv/held_out_cells.txt")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def finish_parent_run(parent_run_id: str, summary: dict[str, Any] | None, status: str = "FINISHED") -> None:
    """The summary on the parent: ``cv_<recipe>_<metric>_mean/_low/_high``, the paired differences
    ``cv_<recipe>_vs_<first>_<metric>_*``, the JSON summary and the markdown table."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    if summary is not None:
        now = int(time.time() * 1000)
        metrics = []
        groups = [(recipe, s) for recipe, s in summary["by_recipe"].items()]
        first = summary["recipes"][0]
        groups += [(f"{recipe}_vs_{first}", d) for recipe, d in summary["vs_first"].items()]
        for name, per_metric in groups:
            for metric, s in per_metric.items():
                for part in ("mean", "low", "high"):
                    if not math.isnan(s[part]):
                        metrics.append(Metric(metric_key(f"cv_{name}_{metric}_{part}"), s[part], now, 0))
        for start in range(0, len(metrics), 500):
            client.log_batch(parent_run_id, metrics=metrics[start : start + 500])
        client.log_text(parent_run_id, json.dumps(summary, indent=2), SUMMARY_ARTIFACT)
        client.log_text(parent_run_id, summary["table"] + "\n", TABLE_ARTIFACT)
    client.set_terminated(parent_run_id, status)
