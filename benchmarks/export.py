"""Cost per answer against accuracy: the full model and its int8 export, at 1, 2 and 4 test-time views.

    uv run --frozen python benchmarks/export.py [--model models:/hematovision@champion | PATH]
        [--views 4,2,1] [--seconds 20] [--per-class 0] [--no-record]

On one trained model (the local registry's champion by default, or any model URI or saved
classifier folder): its int8 export is the one registered with the version (its run's
``export/backbone_int8.tflite``) or, for a version registered before exports existed or a folder,
built here exactly as the register step builds it (``steps.int8_export``: calibrated on training
crops of the prepared split). For each flavour and number of views:

- images/s on this machine's cores and per core: the model alone (``predict_answers``: backbone
  over the views and head, crops made beforehand), batches of 32 TEST crops, for ``--seconds``
  after a warm-up; what a serving worker's model calls cost, without decoding or HTTP;
- accuracy on the validation rows the gate scores and on TEST (``official_test_rows``), each with
  its cell-resampled 95% interval, through the embedding cache (each flavour under its own key);
- the paired difference to the full model at the same views (int8 - full, cells resampled: the
  registry's ``choose_flavour`` comparison at 4 views) on validation.

Needs ``prepared/`` (``hematovision prepare``) and the dataset. Appends a dated section to
benchmarks/RESULTS.md unless ``--no-record`` (smoke runs with ``--per-class``/``--seconds`` small).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from hematovision.settings import quiet_environment

quiet_environment()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import code_version, machine, record  # noqa: E402 - a sibling script, importable once benchmarks/ is on sys.path

BATCH = 32


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def with_views(classifier, views: int):
    """The same model answering with ``views`` test-time views (its flavour, head and open set kept)."""
    from hematovision.model.classifier import Classifier
    from hematovision.model.export import Int8Classifier

    config = dataclasses.replace(classifier.config, tta_views=views)
    if isinstance(classifier, Int8Classifier):
        other = Int8Classifier(classifier.keras_model, config, classifier.tflite_model)
    else:
        other = Classifier(classifier.keras_model, config)
    other.open_set = classifier.open_set
    return other


def throughput(classifier, crops: np.ndarray, seconds: float) -> float:
    """Images/s of the model alone on batches of ``BATCH`` crops, after one warm-up batch."""
    batches = [crops[i : i + BATCH] for i in range(0, len(crops) - BATCH + 1, BATCH)] or [crops]
    classifier.predict_answers(batches[0], BATCH)  # the first call traces the graph / allocates
    done, started, index = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds or done == 0:
        batch = batches[index % len(batches)]
        classifier.predict_answers(batch, BATCH)
        done, index = done + len(batch), index + 1
    return done / (time.perf_counter() - started)


def fmt(metrics: dict, key: str = "accuracy") -> str:
    low, high = metrics.get(f"{key}_ci95", (float("nan"), float("nan")))
    return f"{metrics[key]:.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model URI or saved classifier folder (default: the champion)")
    parser.add_argument("--views", default="4,2,1", help="test-time views to compare, comma-separated")
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per throughput figure")
    parser.add_argument("--per-class", type=int, default=0, help="cap validation and TEST at N images a class (0: all)")
    parser.add_argument("--no-record", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()
    views_list = [int(v) for v in args.views.split(",")]

    import pandas as pd

    from hematovision import stores
    from hematovision.data.dataset import limit_per_cell
    from hematovision.model.export import INT8, Int8Classifier
    from hematovision.params import load_params
    from hematovision.registry.packaging import INT8_SHA256_TAG, download_int8, load_classifier
    from hematovision.registry.paired import pair_answers, paired_difference
    from hematovision.settings import get_settings
    from hematovision.training.evaluate import score_rows
    from hematovision.training.steps import int8_export, load_manifest, official_test_rows

    commit = code_version()  # the code that runs is the code at the start
    settings = get_settings()
    params = load_params(Path("params.yaml"))
    registry = stores.registry(settings)  # points MLflow at the project's store
    model = args.model or f"models:/{registry.name}@champion"
    full = load_classifier(model)
    manifest = load_manifest(settings)

    export_source = "built here (calibrated on training crops, as the register step does)"
    version = None
    if model.startswith("models:/"):
        import mlflow

        info = mlflow.models.get_model_info(model)
        versions = registry.client.search_model_versions(f"run_id = '{info.run_id}'")
        version = next((v for v in versions if v.name == registry.name), None)
    if version is not None and INT8_SHA256_TAG in version.tags:
        with tempfile.TemporaryDirectory() as folder:
            export = download_int8(version.run_id, folder, version.tags[INT8_SHA256_TAG]).read_bytes()
        export_source = f"registered with v{version.version} (serving_flavour={version.tags.get('serving_flavour')})"
    else:
        started = time.perf_counter()
        export = int8_export(settings, params, full, manifest)
        export_source += f" in {time.perf_counter() - started:.0f} s"
    int8 = Int8Classifier.from_classifier(full, export)
    print(f"model {model}; int8 export {len(export) / 1e6:.1f} MB, {export_source}", flush=True)

    def capped(rows: pd.DataFrame) -> pd.DataFrame:
        if args.per_class <= 0:
            return rows
        return rows.sample(frac=1.0, random_state=params.seed).groupby("label").head(args.per_class)

    val_rows = capped(limit_per_cell(manifest[manifest.split == "val"], params.train.max_images_per_cell, params.seed))
    test_rows = capped(official_test_rows(manifest, params))
    data_dir = settings.path(settings.paths.data_dir)
    test_crops = full.crops([data_dir / p for p in test_rows.path[: max(BATCH * 4, 1)]])

    results = []
    with stores.embedding_cache(settings) as cache:
        for views in sorted(views_list, reverse=True):  # fewer views read the more views' cached embeddings
            answers = {}
            for flavour, base in (("full", full), (INT8, int8)):
                classifier = with_views(base, views)
                rate = throughput(classifier, test_crops, args.seconds)
                val, answers[flavour] = score_rows(
                    classifier, val_rows, data_dir, cache, params.evaluate.bootstrap_samples, params.seed
                )
                test, _ = score_rows(
                    classifier, test_rows, data_dir, cache, params.evaluate.bootstrap_samples, params.seed
                )
                row = {"flavour": flavour, "views": views, "rate": rate, "val": val, "test": test}
                if flavour == INT8:
                    row["paired"] = paired_difference(
                        pair_answers(answers["full"], answers[INT8]),
                        "val_accuracy",
                        full.classes,
                        params.promote.bootstrap_samples,
                        params.promote.confidence,
                        params.promote.bootstrap_seed,
                    )
                results.append(row)
                print(
                    f"{flavour} x{views}: {rate:.1f} images/s ({rate / cores():.1f} per core); "
                    f"validation {fmt(val)}, TEST {fmt(test)}"
                    + (
                        f"; int8 - full {row['paired'].describe().replace('vs champion', 'vs full')}"
                        if "paired" in row
                        else ""
                    ),
                    flush=True,
                )

    full4 = next((r["rate"] for r in results if r["flavour"] == "full" and r["views"] == max(views_list)), None)
    lines = [
        f"\n## Cost per answer: full vs int8 export, test-time views — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}",
        f"- model: {model}; int8 export {len(export) / 1e6:.1f} MB, {export_source}",
        f"- throughput: the model alone (`predict_answers` on crops made beforehand), batches of {BATCH}, "
        f"{args.seconds:.0f} s each, on {cores()} cores; validation: the gate's rows "
        f"({val_rows.group.nunique()} cells, {len(val_rows)} images); TEST: {test_rows.group.nunique()} cells, "
        f"{len(test_rows)} images; intervals: 95%, cells resampled"
        + (f"; capped at {args.per_class} images a class" if args.per_class else ""),
        "",
        f"| flavour | views | images/s | per core | vs full x{max(views_list)} | validation accuracy | TEST accuracy | "
        "int8 - full on validation (paired) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        paired = r.get("paired")
        lines.append(
            f"| {r['flavour']} | {r['views']} | {r['rate']:.1f} | {r['rate'] / cores():.1f} | "
            f"{r['rate'] / full4:.2f}x | {fmt(r['val'])} | {fmt(r['test'])} | "
            + (f"{paired.difference:+.4f} [{paired.low:+.4f}, {paired.high:+.4f}]" if paired else "-")
            + " |"
        )
    print("\n".join(lines))
    if not args.no_record:
        record(lines)


if __name__ == "__main__":
    main()
