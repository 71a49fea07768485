"""Cross-validation of recipes (``hematovision cv``): grouped k-fold over TRAIN's cells, TEST untouched.

Every recipe x fold is a task, submitted at once: the flow's task runner decides how many run
together. Here it is a thread pool of ``parallel`` workers (one by default: on a CPU machine one
training already uses every core); a laboratory with a GPU or several machines runs the flow with a
wider pool, or a Dask/Ray task runner (``cv_flow.with_options(task_runner=...)``), or as a deployment
on a work pool (``hematovision deploy``). One MLflow parent run per invocation holds a child run per
recipe and fold and, at the end, the summary (``hematovision.training.cv``). Runs with no Prefect
server (an ephemeral local API) unless PREFECT_API_URL points at one.

    uv run python -m flows.cv --recipes default,other --folds 5 [--profile quick] [--parallel 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import project_params
from hematovision import stores
from hematovision.progress import reporter
from hematovision.settings import get_settings
from hematovision.training import cv
from hematovision.training.steps import load_manifest


@task(name="cv fold", cache_policy=NO_CACHE)
def fold_task(
    parent_run_id: str, recipe: str, fold: int, k: int, seed: int, params_file: str, profile: str | None
) -> dict:
    settings = get_settings()
    logger = get_run_logger()
    params = cv.recipe_params(settings.path(Path(params_file)), recipe, profile)
    manifest = load_manifest(settings)
    site = settings.path(settings.paths.new_site_source)
    # Recomputed from (k, seed) rather than shipped: a task on another worker gets the same folds.
    folds = cv.fold_assignments(manifest, k, seed)
    report = reporter(logger)
    with stores.embedding_cache(settings) as cache:
        result = cv.run_fold(
            manifest,
            folds,
            fold,
            settings.path(settings.paths.data_dir),
            params,
            cache,
            lambda what, done, total: report(f"{recipe} fold {fold + 1}/{k}: {what}", done, total),
            site=site if site.is_dir() else None,
        )
    result["run_id"] = cv.log_fold(parent_run_id, recipe, params, result)
    m = result["metrics"]
    logger.info(
        "%s fold %d/%d: held-out accuracy %.4f, macro-F1 %.4f on %d images (%d cells) in %.0f s",
        recipe,
        fold + 1,
        k,
        m["accuracy"],
        m["macro_f1"],
        result["n_held_out_images"],
        len(result["held_out_cells"]),
        result["timings"]["fold_s"],
    )
    return result


@flow(name="hematovision-cv", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def cv_flow(
    recipes: list[str] | None = None,
    folds: int = 5,
    seed: int | None = None,
    params_file: str = "params.yaml",
    profile: str | None = None,
) -> dict:
    """Cross-validate each recipe (a profile of params.yaml, or 'default') on the same grouped folds
    of TRAIN's cells; the mean and interval of every metric, logged under one MLflow parent run."""
    started = time.perf_counter()
    recipes = list(recipes or [cv.DEFAULT_RECIPE])
    settings = get_settings()
    for recipe in recipes:  # an unknown recipe fails here, before any training
        cv.recipe_params(settings.path(Path(params_file)), recipe, profile)
    seed = project_params(params_file, profile).seed if seed is None else seed
    manifest = load_manifest(settings)
    assignment = cv.fold_assignments(manifest, folds, seed)  # too few cells fail here, before training
    logger = get_run_logger()
    logger.info("%d folds of %d cells (seed %d)", folds, cv.cv_rows(manifest).group.nunique(), seed)
    parent = cv.start_parent_run(settings, recipes, folds, seed, profile)
    try:
        futures = {
            (recipe, i): fold_task.submit(parent, recipe, i, folds, seed, params_file, profile)
            for recipe in recipes
            for i in range(folds)
        }
        results = {recipe: [futures[(recipe, i)].result() for i in range(folds)] for recipe in recipes}
        summary = cv.summarise_recipes(results, folds, seed)
    except BaseException:
        cv.finish_parent_run(parent, None, "FAILED")
        raise
    cv.finish_parent_run(parent, summary)
    logger.info("cross-validation (parent run %s):\n%s", parent, summary["table"])
    return {
        "parent_run_id": parent,
        "summary": summary,
        "folds": results,
        "rows_per_fold": assignment.value_counts().sort_index().tolist(),
        "timings_s": {"total": round(time.perf_counter() - started, 1)},
    }


def run_cv(
    recipes: list[str],
    folds: int = 5,
    seed: int | None = None,
    params_file: str = "params.yaml",
    profile: str | None = None,
    parallel: int = 1,
) -> dict:
    """:func:`cv_flow` with ``parallel`` folds running at once (threads of this process)."""
    runner = ThreadPoolTaskRunner(max_workers=max(1, parallel))
    return cv_flow.with_options(task_runner=runner)(
        recipes=recipes, folds=folds, seed=seed, params_file=params_file, profile=profile
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=cv_flow.__doc__)
    parser.add_argument("--recipes", default=cv.DEFAULT_RECIPE)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args()
    summary = run_cv(cv.parse_recipes(args.recipes), args.folds, args.seed, args.params, args.profile, args.parallel)
    print(summary["summary"]["table"])
