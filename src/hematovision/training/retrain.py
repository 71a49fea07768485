"""Retraining on the pathologists' corrections: the loop that turns reviews into the next model.

Steps (``flows/retraining.py`` runs each as a Prefect task; ``hematovision retrain`` runs that flow):

1. :func:`export_step` — the corrections become a new DVC data version (``corrections/`` +
   ``corrections.dvc``); nothing new, nothing changes.
2. :func:`manifest_step` — one manifest of raw data + corrections. Each correction image is its own
   cell (group ``corrections/<sha256>``). A deterministic share of the corrections, chosen by the
   image's sha256, is the new site's *holdout*: scored, never trained on. The champion (the parent)
   is pinned by version and copied next to the manifest.
3. :func:`train_challenger_step` — ``retrain.mode: head`` (the fast path): a new head on the
   parent's unchanged backbone, warm-started from the parent's head, on cached embeddings of the
   raw data plus embeddings of the (new) correction images only; ``finetune``: the full two-phase
   training of ``train.py`` on raw data + corrections.
4. :func:`evaluate_step` — parent and challenger scored alike on the official TEST and the holdout.
5. :func:`register_step` — an MLflow run (metrics of both, manifest, model) and a registered version
   with the lineage as tags: raw data hash, corrections hash, parent version, git commit.
6. :func:`gate_step` — the registry's gate (``registry/gate.py``): the challenger must
   win on the holdout and may not lose more than ``retrain.guard_tolerance`` on TEST; promoted only
   then. The decision and its reasons go on the run, on the version (tag ``gate``) and in the logs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from hematovision import stores
from hematovision.data.dataset import limit_per_cell
from hematovision.data.dvc import dvc_data_hash
from hematovision.lab.export import export_corrections
from hematovision.model.classifier import CONFIG_FILE, Classifier
from hematovision.monitoring.drift import log_reference
from hematovision.params import Params
from hematovision.registry import gate
from hematovision.registry.paired import pair_answers
from hematovision.registry.registry import CHAMPION
from hematovision.registry.tracking import configure_mlflow, git_commit
from hematovision.settings import Settings
from hematovision.training.calibrate import extend_open_set
from hematovision.training.corrections_data import HOLDOUT, challenger_classes, corrections_rows
from hematovision.training.evaluate import score_rows
from hematovision.training.head import train_head
from hematovision.training.metrics import flatten_for_mlflow
from hematovision.training.steps import load_manifest, official_test_rows

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]

MANIFEST = "manifest.csv"
CONTEXT = "context.json"
TRAINING = "training.json"
EVALUATION = "evaluation.json"
REPORT = "report.json"
PARENT_DIR = "parent"
# The folder's name is the artifact's key in the logged model (packaging.ARTIFACT_KEY).
CHALLENGER_DIR = "challenger/classifier"


class RetrainError(RuntimeError):
    """Retraining cannot start (no champion, no data)."""


def _out(settings: Settings) -> Path:
    out = settings.path(settings.paths.retrain_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _read(settings: Settings, name: str) -> dict[str, Any]:
    return json.loads((settings.path(settings.paths.retrain_dir) / name).read_text())


def _write(settings: Settings, name: str, value: dict[str, Any]) -> None:
    (_out(settings) / name).write_text(json.dumps(value, indent=2, default=str))


# --- 1. export -------------------------------------------------------------------------------------
def export_step(settings: Settings) -> dict[str, Any]:
    """The agreed corrections as a DVC-pinned dataset version; returns counts and its md5."""
    return export_corrections(settings)


# --- 2. manifest -----------------------------------------------------------------------------------
def manifest_step(settings: Settings, params: Params) -> dict[str, Any]:
    """Write ``retrain/manifest.csv`` (raw + corrections, with the holdout) and pin the parent."""
    import mlflow

    from hematovision.registry.packaging import ARTIFACT_KEY  # heavy: imports MLflow's pyfunc

    rp = params.retrain
    registry = stores.registry(settings)
    uri = settings.tracking_uri
    champion = registry.version_by_alias(CHAMPION)
    if champion is None:
        raise RetrainError("there is no champion to retrain from: run `hematovision run` first")
    out = _out(settings)
    parent_dir = out / PARENT_DIR
    marker = parent_dir / ".registry_version"
    wanted = f"{settings.registry.registered_model}/{champion.version}@{uri}"
    if not (marker.exists() and marker.read_text() == wanted):  # versions are immutable: reuse a copy
        if parent_dir.exists():
            shutil.rmtree(parent_dir)
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{settings.registry.registered_model}/{champion.version}"
            )
        )
        shutil.copytree(downloaded / "artifacts" / ARTIFACT_KEY, parent_dir)
        marker.write_text(wanted)

    data_dir = settings.path(settings.paths.data_dir)
    raw = load_manifest(settings)
    raw["path"] = [str(data_dir / p) for p in raw.path]
    raw["source"], raw["sha256"] = "raw", ""
    learn = raw[raw.split.isin(["train", "val"])]
    if rp.mode == "head":
        learn = limit_per_cell(learn, rp.max_raw_images_per_cell, params.seed)
    elif rp.mode != "finetune":
        raise RetrainError(f"retrain.mode must be 'head' or 'finetune', not {rp.mode!r}")
    test = official_test_rows(raw, params)
    corrections_dir = settings.path(settings.paths.corrections_dataset_dir)
    parent_classes = json.loads((parent_dir / CONFIG_FILE).read_text())["classes"]
    corrections = corrections_rows(
        corrections_dir, rp.holdout_fraction, [*parent_classes, *stores.answerable_types(settings)]
    )
    classes, waiting = challenger_classes(parent_classes, corrections, settings.lab.new_class_min_corrections)
    corrections = corrections[corrections.label.isin(classes)]
    manifest = pd.concat([learn, test, corrections], ignore_index=True)[
        ["path", "split", "label", "group", "source", "sha256"]
    ]
    manifest.to_csv(out / MANIFEST, index=False)
    context = {
        "parent_version": str(champion.version),
        "data_hash": dvc_data_hash(data_dir.with_suffix(".dvc")),
        "corrections_hash": dvc_data_hash(corrections_dir.with_name(corrections_dir.name + ".dvc")),
        "mode": rp.mode,
        "classes": classes,
        "new_classes": [c for c in classes if c not in parent_classes],
        "waiting_types": waiting,
        "n_raw_train": int((manifest.source.eq("raw") & manifest.split.isin(["train", "val"])).sum()),
        "n_test": int(len(test)),
        "n_corrections_train": int((manifest.source.eq("corrections") & manifest.split.eq("train")).sum()),
        "n_corrections_holdout": int(manifest.split.eq(HOLDOUT).sum()),
    }
    _write(settings, CONTEXT, context)
    return context


def nothing_to_learn(context: dict[str, Any]) -> str | None:
    """Why retraining would be pointless (no corrections to train on), or None."""
    if context["n_corrections_train"] == 0:
        return (
            f"nothing to retrain on: {context['n_corrections_train']} corrections to learn from "
            f"({context['n_corrections_holdout']} held out)"
        )
    return None


def skipped_summary(
    context: dict[str, Any], exported: dict[str, Any], reason: str, timings: dict[str, float]
) -> dict[str, Any]:
    return {
        **_lineage_summary(context, exported, timings),
        "version": None,
        "run_id": None,
        "promoted": False,
        "skipped": reason,
        "gate": {"passed": False, "reasons": [reason], "summary": reason},
        "champion": {},
        "challenger": {},
        "training": {},
    }


def load_retrain_manifest(settings: Settings) -> pd.DataFrame:
    return pd.read_csv(
        settings.path(settings.paths.retrain_dir) / MANIFEST, dtype={"sha256": str}, keep_default_na=False
    )


# --- 3. train --------------------------------------------------------------------------------------
def train_challenger_step(settings: Settings, params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Train the challenger on the manifest's training rows; saved under ``retrain/challenger``."""
    report = progress or (lambda *_: None)
    out = _out(settings)
    manifest = load_retrain_manifest(settings)
    if not (manifest.source.eq("corrections") & manifest.split.eq("train")).any():
        raise RetrainError("no corrections to learn from (all of them are held out, or there are none)")
    started = time.perf_counter()
    classes = _read(settings, CONTEXT)["classes"]
    with stores.embedding_cache(settings) as cache:
        if params.retrain.mode == "head":
            classifier = Classifier.load(out / PARENT_DIR)
            if classifier.classes != classes:  # the laboratory added a type: a new head with its class
                classifier = classifier.with_classes(classes)
            result = train_head(classifier, manifest, params, cache, report)
            if classifier.open_set is not None:  # a parent saved before open sets existed has none to extend
                report("fitting the open set", 0, 1)
                fixes = manifest[(manifest.source == "corrections") & (manifest.split == "train")]
                calibration_rows = manifest[manifest.split.isin(["val", HOLDOUT])]
                result["calibration"] = extend_open_set(
                    classifier,
                    [Path(p) for p in fixes.path],
                    list(fixes.label),
                    [Path(p) for p in calibration_rows.path],
                    list(calibration_rows.label),
                    cache,
                    params.open_set,
                )
        else:
            from hematovision.training.train import train  # heavy: imports Keras

            rows = manifest[manifest.split.isin(["train", "val"])].copy()
            result_full = train(rows, Path("/"), params, cache, progress, classes)
            classifier = result_full.classifier
            result = {
                "val": result_full.val_metrics,
                "timings": result_full.timings,
                "n_train_images": result_full.n_train_images,
            }
    target = out / CHALLENGER_DIR
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    classifier.save(target)
    result["timings"] = {**result.get("timings", {}), "train_s": time.perf_counter() - started}
    _write(settings, TRAINING, result)
    return result


# --- 4. evaluate -----------------------------------------------------------------------------------
def evaluate_step(settings: Settings, params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Parent and challenger on the official TEST and on the corrections' holdout, the same rows
    for both (with the head fast path they share the cached embeddings). Their per-image answers
    (``retrain/answers.csv``) are what the gate pairs; their classes are in ``classes``."""
    out = _out(settings)
    manifest = load_retrain_manifest(settings)
    splits = {"test": manifest[manifest.split == "test"], HOLDOUT: manifest[manifest.split == HOLDOUT]}
    results: dict[str, Any] = {"classes": {}}
    answers: list[pd.DataFrame] = []
    started = time.perf_counter()
    with stores.embedding_cache(settings) as cache:
        for who, folder in (("champion", PARENT_DIR), ("challenger", CHALLENGER_DIR)):
            classifier = Classifier.load(out / folder)
            results[who], results["classes"][who] = {}, list(classifier.classes)
            for name, rows in splits.items():
                if rows.empty:
                    continue
                if progress:
                    progress(f"scoring the {who} on {name}", 0, len(rows))
                results[who][name], answered = score_rows(
                    classifier, rows, Path("/"), cache, params.evaluate.bootstrap_samples, params.seed
                )
                answers.append(answered.assign(who=who, split=name))
    results["timings"] = {"evaluate_s": time.perf_counter() - started}
    _write(settings, EVALUATION, results)
    pd.concat(answers or [pd.DataFrame(columns=["who", "split"])]).to_csv(out / "answers.csv", index=False)
    return results


def flat_metrics(evaluation: dict[str, Any], who: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, metrics in evaluation.get(who, {}).items():
        out.update(flatten_for_mlflow(metrics, name))
    return out


# --- 5. register -----------------------------------------------------------------------------------
def register_step(settings: Settings, params: Params) -> dict[str, Any]:
    """Log the retraining run to MLflow and register the challenger with its lineage as tags."""
    import mlflow

    from hematovision.registry.packaging import log_classifier  # heavy: imports MLflow's pyfunc

    configure_mlflow(settings)
    out = _out(settings)
    context, training, evaluation = _read(settings, CONTEXT), _read(settings, TRAINING), _read(settings, EVALUATION)
    commit = git_commit(settings.paths.project_dir)
    lineage = {
        "data_hash": context["data_hash"],
        "corrections_hash": context["corrections_hash"],
        "parent_version": context["parent_version"],
        "git_commit": commit,
        "classes": ",".join(context["classes"]),
    }
    with mlflow.start_run(run_name=f"retrain-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.set_tags({**lineage, "step": "retrain", "retrain_mode": context["mode"]})
        mlflow.log_params(params.flat())
        mlflow.log_params({k: context[k] for k in context if k.startswith("n_")})
        mlflow.log_metrics(flat_metrics(evaluation, "challenger"))
        mlflow.log_metrics({f"champion_{k}": v for k, v in flat_metrics(evaluation, "champion").items()})
        mlflow.log_metrics({f"time_{k}": v for k, v in training.get("timings", {}).items()})
        mlflow.log_artifact(str(out / MANIFEST), "retrain")
        mlflow.log_dict({"context": context, "training": training, "evaluation": evaluation}, "retrain/report.json")
        model_uri = log_classifier(out / CHALLENGER_DIR)
        _log_drift_reference(settings, params, out)
        run_id = run.info.run_id
    tags = {**lineage, "run_id": run_id, "trained_on": "raw+corrections", "retrain_mode": context["mode"]}
    for who_split, key in (("test", "accuracy"), ("test", "macro_f1"), (HOLDOUT, "accuracy"), (HOLDOUT, "macro_f1")):
        value = evaluation["challenger"].get(who_split, {}).get(key)
        if value is not None:
            tags[f"{who_split}_{key}"] = f"{value:.4f}"
    version = stores.registry(settings).register(model_uri, tags)
    return {"version": version, "run_id": run_id, "tags": tags}


def _log_drift_reference(settings: Settings, params: Params, out: Path) -> None:
    """The drift monitor's reference for this version (``drift.log_reference``, as the training
    flow logs one): the raw validation cells (in-distribution, never trained on) and the corrections
    it trained on, so the new site it was retrained for no longer counts as drift once it serves."""
    manifest = load_retrain_manifest(settings)
    learned = manifest[
        ((manifest.source == "raw") & (manifest.split == "val"))
        | ((manifest.source == "corrections") & (manifest.split == "train"))
    ].assign(split="val")
    log_reference(
        Classifier.load(out / CHALLENGER_DIR),
        learned,
        Path("."),
        out,
        settings.monitoring.reference_max_images,
        params.seed,
    )


# --- 6. gate ---------------------------------------------------------------------------------------
def gate_step(settings: Settings, params: Params, version: str, run_id: str, promote: bool = True) -> dict[str, Any]:
    """The registry's gate, paired on the images both models answered: the holdout (must win beyond
    noise) with TEST as a guard (may not be worse beyond the margin); promotes only if it passes.
    The decision, with its intervals, goes on the run and on the version."""
    rp = params.retrain
    registry = stores.registry(settings)
    context, evaluation = _read(settings, CONTEXT), _read(settings, EVALUATION)
    champion = registry.version_by_alias(CHAMPION)
    decision = gate.retraining_refusal(
        context["n_corrections_holdout"],
        rp,
        None if champion is None else str(champion.version),
        context["parent_version"],
        promote,
    )
    if decision is None:
        policy, guards = gate.retraining_policy(rp, params.promote)
        answers = pd.read_csv(_out(settings) / "answers.csv", dtype=str, keep_default_na=False)
        by = {(w, s): rows for (w, s), rows in answers.groupby(["who", "split"])}
        decision = gate.promote(
            registry,
            version,
            policy,
            guards=guards,
            paired={
                s: pair_answers(rows, by[("challenger", s)])
                for (w, s), rows in by.items()
                if w == "champion" and ("challenger", s) in by
            },
            classes=(evaluation["classes"]["champion"], evaluation["classes"]["challenger"]),
        )
    else:
        registry.record_gate(version, decision)
    client = registry.client
    client.set_tag(run_id, "gate_decision", "promoted" if decision.passed else "refused")
    client.set_tag(run_id, "gate_reasons", decision.summary()[:5000])
    client.log_param(
        run_id,
        "gate_policy",
        json.dumps(
            {
                "metric": rp.metric,
                "min_improvement": rp.min_improvement,
                "per_class_tolerance": rp.per_class_tolerance,
                "guard": {rp.guard_metric: rp.guard_tolerance},
                "paired_bootstrap": {
                    "samples": params.promote.bootstrap_samples,
                    "confidence": params.promote.confidence,
                    "seed": params.promote.bootstrap_seed,
                },
            }
        ),
    )
    return {
        "passed": decision.passed,
        "promoted": decision.passed,
        "reasons": decision.reasons,
        "summary": decision.summary(),
    }


# --- the whole loop --------------------------------------------------------------------------------
def summarize(
    context: dict,
    training: dict,
    evaluation: dict,
    registered: dict,
    gate: dict,
    exported: dict,
    timings: dict[str, float],
) -> dict[str, Any]:
    def headline(who: str) -> dict[str, float]:
        return {
            f"{split}_{k}": evaluation[who][split][k]
            for split in ("test", HOLDOUT)
            if split in evaluation[who]
            for k in ("accuracy", "macro_f1")
        }

    return {
        **_lineage_summary(context, exported, timings),
        "version": registered["version"],
        "run_id": registered["run_id"],
        "promoted": gate["passed"],
        "gate": gate,
        "champion": headline("champion"),
        "challenger": headline("challenger"),
        "training": {k: v for k, v in training.items() if k != "val"},
    }


def _lineage_summary(context: dict[str, Any], exported: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """What every retraining summary says, skipped or not: parent, mode, data versions, corrections."""
    return {
        "parent_version": context["parent_version"],
        "mode": context["mode"],
        "data_hash": context["data_hash"],
        "corrections_hash": context["corrections_hash"],
        "corrections": {
            "exported": exported.get("images"),
            "added": exported.get("added"),
            "train": context["n_corrections_train"],
            "holdout": context["n_corrections_holdout"],
        },
        "timings_s": timings,
    }


def write_report(settings: Settings, summary: dict[str, Any]) -> None:
    _write(settings, REPORT, summary)
