"""The training flow: import -> prepare -> train -> evaluate -> register -> promote.

Runs with no Prefect server (an ephemeral local API) unless PREFECT_API_URL points at one. Each
task is a call into ``hematovision.data.dvc`` (the import) or ``hematovision.training.steps``;
retries only where a retry can help (the data import touches the upstream folder, registering
touches the MLflow store).

    uv run python -m flows.training --profile quick
"""

from __future__ import annotations

import argparse

from prefect import flow, get_run_logger, task

from flows import StepTimer, project_params, push_to_remote
from hematovision.data import dvc
from hematovision.progress import reporter
from hematovision.settings import get_settings
from hematovision.training import steps


@task(name="import data", retries=2, retry_delay_seconds=5)
def import_data() -> dict:
    result = dvc.import_data(get_settings())
    logger = get_run_logger()
    logger.info("dataset %s at version %s", result["data_dir"], result["data_hash"])
    if result["changed"]:
        logger.warning("upstream dataset changed from the pinned %s: commit data.dvc", result["pinned_hash"])
    return result


@task(name="prepare")
def prepare(params_file: str, profile: str | None) -> dict:
    summary = steps.prepare_step(get_settings(), project_params(params_file, profile), reporter(get_run_logger()))
    get_run_logger().info("prepared: %s", {k: v for k, v in summary.items() if k in ("counts", "n_bad")} or summary)
    return summary


@task(name="train")
def train(params_file: str, profile: str | None) -> dict:
    logger = get_run_logger()
    report = steps.train_step(get_settings(), project_params(params_file, profile), reporter(logger))
    logger.info(
        "trained run %s: val accuracy %.4f, macro-F1 %.4f",
        report["run_id"],
        report["val"]["accuracy"],
        report["val"]["macro_f1"],
    )
    return report


@task(name="evaluate")
def evaluate(params_file: str, profile: str | None) -> dict:
    logger = get_run_logger()
    results = steps.evaluate_step(get_settings(), project_params(params_file, profile), reporter(logger))
    for name in ("test", "new_site"):
        if name in results:
            logger.info("%s: accuracy %.4f, macro-F1 %.4f", name, results[name]["accuracy"], results[name]["macro_f1"])
    return results


@task(name="register", retries=2, retry_delay_seconds=2)
def register(params_file: str, profile: str | None) -> dict:
    result = steps.register_step(get_settings(), project_params(params_file, profile))
    get_run_logger().info("registered version %s as challenger", result["version"])
    return result


@task(name="promote")
def promote_version(version: str, params_file: str, profile: str | None) -> dict:
    decision = steps.promote_step(get_settings(), project_params(params_file, profile), version)
    logger = get_run_logger()
    (logger.info if decision.passed else logger.warning)(decision.summary())
    return {"passed": decision.passed, "reasons": decision.reasons}


@flow(name="hematovision-training", log_prints=True)
def training_flow(profile: str | None = None, params_file: str = "params.yaml", promote: bool = True) -> dict:
    """Train a new model on the pinned data and promote it if it beats the champion."""
    timed = StepTimer()
    timings = timed.timings

    data = timed("import", import_data)
    timed("push", push_to_remote)
    timed("prepare", prepare, params_file, profile)
    report = timed("train", train, params_file, profile)
    results = timed("evaluate", evaluate, params_file, profile)
    registered = timed("register", register, params_file, profile)
    if promote:
        gate = timed("promote", promote_version, registered["version"], params_file, profile)
    else:
        gate = {"passed": False, "reasons": ["promotion not asked for"]}
    return {
        "data_hash": data["data_hash"],
        "run_id": report["run_id"],
        "version": registered["version"],
        "metrics": {"val": report["val"], **{k: v for k, v in results.items() if k != "timings"}},
        "gate": gate,
        "timings_s": timings,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=training_flow.__doc__)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args()
    training_flow(profile=args.profile, params_file=args.params, promote=not args.no_promote)
