"""The retraining flow: export corrections -> manifest -> train challenger -> evaluate -> register -> gate.

Runs with no Prefect server (an ephemeral local API) unless PREFECT_API_URL points at one. Each
task is a call into ``hematovision.training.retrain``; the drift monitor calls ``retraining_flow()`` with no
arguments. The service follows the ``champion`` alias, so a promotion needs nothing more.

    uv run python -m flows.retraining [--profile quick] [--no-promote]
"""

from __future__ import annotations

import argparse

from prefect import flow, get_run_logger, task

from flows import StepTimer, project_params, push_to_remote
from hematovision.progress import reporter
from hematovision.settings import get_settings
from hematovision.training import retrain


@task(name="export corrections", retries=1, retry_delay_seconds=2)
def export_corrections() -> dict:
    result = retrain.export_step(get_settings())
    get_run_logger().info(
        "corrections: %s images (%s new, %s removed, %s disputed left out), DVC md5 %s",
        result["images"],
        result["added"],
        result["removed"],
        result["disputed"],
        result["md5"],
    )
    return result


@task(name="retraining manifest")
def manifest(params_file: str, profile: str | None) -> dict:
    context = retrain.manifest_step(get_settings(), project_params(params_file, profile))
    get_run_logger().info(
        "parent v%s, mode %s: %s raw images, %s corrections to learn from, %s held out, %s TEST images",
        context["parent_version"],
        context["mode"],
        context["n_raw_train"],
        context["n_corrections_train"],
        context["n_corrections_holdout"],
        context["n_test"],
    )
    return context


@task(name="train challenger")
def train_challenger(params_file: str, profile: str | None) -> dict:
    logger = get_run_logger()
    result = retrain.train_challenger_step(get_settings(), project_params(params_file, profile), reporter(logger))
    logger.info("challenger trained on %s images in %.0f s", result.get("n_train_images"), result["timings"]["train_s"])
    return result


@task(name="evaluate challenger")
def evaluate(params_file: str, profile: str | None) -> dict:
    logger = get_run_logger()
    results = retrain.evaluate_step(get_settings(), project_params(params_file, profile), reporter(logger))
    for who in ("champion", "challenger"):
        for split, m in results[who].items():
            logger.info(
                "%s on %s: accuracy %.4f, macro-F1 %.4f (%d images)",
                who,
                split,
                m["accuracy"],
                m["macro_f1"],
                m["n_images"],
            )
    return results


@task(name="register challenger", retries=2, retry_delay_seconds=2)
def register(params_file: str, profile: str | None) -> dict:
    result = retrain.register_step(get_settings(), project_params(params_file, profile))
    get_run_logger().info(
        "registered version %s (lineage %s)",
        result["version"],
        {k: result["tags"][k] for k in ("data_hash", "corrections_hash", "parent_version", "git_commit")},
    )
    return result


@task(name="gate")
def gate(version: str, run_id: str, params_file: str, profile: str | None, promote: bool) -> dict:
    decision = retrain.gate_step(get_settings(), project_params(params_file, profile), version, run_id, promote)
    logger = get_run_logger()
    (logger.info if decision["passed"] else logger.warning)("version %s: %s", version, decision["summary"])
    return decision


@flow(name="hematovision-retraining", log_prints=True)
def retraining_flow(profile: str | None = None, params_file: str = "params.yaml", promote: bool = True) -> dict:
    """Retrain on raw data + the pathologists' corrections; promote the challenger only if it wins
    on the new site's held-out corrections without losing on TEST."""
    timed = StepTimer()
    timings = timed.timings

    exported = timed("export", export_corrections)
    timed("push", push_to_remote)
    context = timed("manifest", manifest, params_file, profile)
    reason = retrain.nothing_to_learn(context)
    if reason:  # e.g. drift alerted before any pathologist corrected anything: not a failure
        get_run_logger().warning(reason)
        return retrain.skipped_summary(context, exported, reason, timings)
    training = timed("train", train_challenger, params_file, profile)
    evaluation = timed("evaluate", evaluate, params_file, profile)
    registered = timed("register", register, params_file, profile)
    decision = timed("gate", gate, registered["version"], registered["run_id"], params_file, profile, promote)
    summary = retrain.summarize(context, training, evaluation, registered, decision, exported, timings)
    retrain.write_report(get_settings(), summary)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=retraining_flow.__doc__)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args()
    retraining_flow(profile=args.profile, params_file=args.params, promote=not args.no_promote)
