"""Benchmark of drift monitoring: false alarms on the training lab's own traffic, and how many images
from a new site it takes before drift is flagged (and alerted).

    uv run python benchmarks/drift.py            # the champion of the project's registry (`hematovision run`)
    uv run python benchmarks/drift.py --quick    # a quick-profile model trained here in a temporary project

The champion's predictions are simulated exactly as the service makes them (decode, image statistics,
crop -> backbone -> head, embedding) and each window is judged by ``drift.check_window`` (the real
Evidently report) against the champion's reference from MLflow:

* in-distribution: windows of blood-cells TEST (cells the model never saw, one image per cell per
  window, as production sees each cell once); every drifting window is a false alarm;
* new site: a stream of TEST images switching to pbc-sample at a random point inside a window;
  the delay is the number of new-site images logged until the window that is flagged drifting
  ends (and until the alert, after ``drift.persistence`` drifting windows).

Beside the platform's choice, each signal and Evidently's default embedding method (a domain
classifier with a bootstrap threshold) are scored on the same windows. Appends a dated section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import machine, record

from hematovision.settings import get_settings, quiet_environment

quiet_environment()

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")


def cells(root: Path, cls: str) -> dict[str, list[Path]]:
    by_cell = defaultdict(list)
    for path in sorted((root / cls.upper()).glob("*.jpeg")):
        by_cell[re.match(r"_(\d+)_", path.name).group(1)].append(path)
    return by_cell


def quick_project(shared: Path, cells_per_class: int = 16, per_cell: int = 3) -> Path:
    """A temporary project with a quick-profile champion trained on a subset of the real TRAIN
    cells (validation: half of the cells, so the reference has ~100 images)."""
    import yaml

    root = Path(tempfile.mkdtemp(prefix="hv-drift-bench-"))
    upstream = root / "upstream" / "dataset2-master" / "images"
    for cls in CLASSES:
        for paths in list(cells(shared / "blood-cells/dataset2-master/images/TRAIN", cls).values())[:cells_per_class]:
            (upstream / "TRAIN" / cls.upper()).mkdir(parents=True, exist_ok=True)
            for p in paths[:per_cell]:
                shutil.copy(p, upstream / "TRAIN" / cls.upper() / p.name)
        (upstream / "TEST" / cls.upper()).mkdir(parents=True, exist_ok=True)
        for p in sorted((shared / "blood-cells/dataset2-master/images/TEST" / cls.upper()).glob("*.jpeg"))[:2]:
            shutil.copy(p, upstream / "TEST" / cls.upper() / p.name)
    project = root / "project"
    project.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["val_fraction"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "HEMATOVISION_PROJECT_DIR": str(project),
        "HEMATOVISION_DATA_SOURCE": str(root / "upstream"),
        "HEMATOVISION_NEW_SITE_SOURCE": str(root / "no-new-site"),
        "HEMATOVISION_MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlruns/mlflow.db",
        "HEMATOVISION_MLFLOW_ARTIFACT_LOCATION": str(project / "mlruns" / "artifacts"),
        "KERAS_HOME": str(project / ".keras"),
    }
    for cmd in (
        ["git", "init", "-q"],
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "--allow-empty", "-m", "init"],
        [str(Path(sys.executable).parent / "dvc"), "init", "-q"],
        [str(Path(sys.executable).parent / "hematovision"), "run", "--profile", "quick"],
    ):
        result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    os.environ.update({k: v for k, v in env.items() if k.startswith(("HEMATOVISION_", "KERAS_"))})
    os.chdir(project)
    get_settings.cache_clear()
    return project


def profile_images(classifier, paths: list[Path]):
    """The rows the service would log for these images (same layout as the reference)."""
    from hematovision.monitoring.drift import profile_frame
    from hematovision.serving.batcher import run_model
    from hematovision.serving.images import prepare_image

    stats, labels, confidences, embeddings = [], [], [], []
    for start in range(0, len(paths), 32):
        prepared = [prepare_image(p.read_bytes()) for p in paths[start : start + 32]]
        answers = run_model(classifier, prepared)
        probabilities, emb = answers.probabilities, answers.embeddings
        stats += [p.stats for p in prepared]
        labels += answers.labels(classifier.classes)
        confidences += list(probabilities.max(axis=1))
        embeddings.append(emb)
    import numpy as np

    return profile_frame(stats, labels, confidences, np.concatenate(embeddings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="train a quick-profile champion in a temporary project")
    parser.add_argument("--id-windows", type=int, default=30, help="in-distribution windows (false alarms)")
    parser.add_argument("--trials", type=int, default=10, help="streams switching to the new site")
    parser.add_argument(
        "--copies", type=int, default=6, help="augmented copies per TEST cell in the in-distribution pool"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    if subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip():
        commit += " (with uncommitted changes)"
    settings = get_settings()
    shared = settings.path(settings.paths.data_source).parent
    started = time.perf_counter()
    if args.quick:
        quick_project(shared)
        settings = get_settings()
    train_s = time.perf_counter() - started

    import numpy as np
    import pandas as pd
    from evidently.metrics.embeddings import ModelDriftMethod

    from hematovision.monitoring.drift import DriftPolicy, check_window, fetch_reference, project_embeddings
    from hematovision.monitoring.monitor import champion
    from hematovision.registry.packaging import load_classifier
    from hematovision.registry.tracking import configure_mlflow

    configure_mlflow(settings)
    version, _ = champion(settings)
    classifier = load_classifier(f"models:/{settings.registry.registered_model}@champion")
    reference = fetch_reference(settings, version)
    policy = DriftPolicy.from_settings(settings)
    size, persistence = settings.monitoring.window_size, settings.drift.persistence
    rng = random.Random(args.seed)

    started = time.perf_counter()
    test_root = shared / "blood-cells/dataset2-master/images/TEST"
    pool = {
        (cls, cell): rng.sample(paths, min(args.copies, len(paths)))
        for cls in CLASSES
        for cell, paths in cells(test_root, cls).items()
    }
    keys = list(pool)
    flat = [(key, p) for key in keys for p in pool[key]]
    id_rows = profile_images(classifier, [p for _, p in flat])
    id_rows["cell"] = [f"{k[0]}/{k[1]}" for k, _ in flat]
    site_paths = [p for cls in CLASSES for p in sorted((shared / "pbc-sample" / cls).glob("*.jpg"))]
    site_rows = profile_images(classifier, rng.sample(site_paths, 400))
    embed_s = time.perf_counter() - started

    def id_window(n: int) -> pd.DataFrame:
        """n images of n distinct TEST cells (one random copy each)."""
        chosen = rng.sample(sorted(set(id_rows.cell)), n)
        picks = [rng.choice(list(id_rows.index[id_rows.cell == c])) for c in chosen]
        return id_rows.loc[picks].drop(columns="cell")

    emb_cols = [c for c in reference.columns if c.startswith("emb_")]
    evidently_default = ModelDriftMethod(bootstrap=True)  # what EmbeddingsDrift does with no method for < 1000 rows

    def judge(window: pd.DataFrame) -> dict:
        result = check_window(reference, window, policy)
        ref_pcs, cur_pcs = project_embeddings(
            reference[emb_cols].to_numpy(np.float32), window[emb_cols].to_numpy(np.float32), policy.embedding_components
        )
        auc, default_drift, _ = evidently_default(pd.DataFrame(cur_pcs), pd.DataFrame(ref_pcs))
        flags = {name: s["drift"] for name, s in result.signals.items()}
        return {
            "drifting": result.drifting,
            **flags,
            "evidently_default_embeddings": bool(default_drift),
            "scores": {name: s["score"] for name, s in result.signals.items()} | {"classifier_auc": float(auc)},
        }

    started = time.perf_counter()
    id_results = [judge(id_window(size)) for _ in range(args.id_windows)]
    per_window_s = (time.perf_counter() - started) / args.id_windows
    # Alerts on in-distribution traffic: the persistence rule over the windows in sequence.
    streak, id_alerts = 0, 0
    for r in id_results:
        streak = streak + 1 if r["drifting"] else 0
        id_alerts += streak == persistence

    delays, alert_delays, switch_alarms = [], [], 0
    for _ in range(args.trials):
        before = rng.randrange(size, 3 * size)  # the switch falls anywhere inside a window
        n_windows = (before + 4 * size) // size
        stream_id = pd.concat([id_window(min(size, before - i)) for i in range(0, before, size)])
        stream = pd.concat([stream_id, site_rows.sample(n_windows * size - before, random_state=rng.randrange(10**6))])
        streak, flagged, alerted = 0, None, None
        for w in range(n_windows):
            window = stream.iloc[w * size : (w + 1) * size]
            drifting = judge(window)["drifting"]
            end = (w + 1) * size
            if drifting and end <= before:
                switch_alarms += 1
            streak = streak + 1 if drifting else 0
            if drifting and end > before and flagged is None:
                flagged = end - before
            if streak >= persistence and end > before and alerted is None:
                alerted = end - before
        delays.append(flagged)
        alert_delays.append(alerted)

    def rate(key: str) -> str:
        return f"{sum(r[key] for r in id_results)}/{len(id_results)}"

    def spread(name: str) -> str:
        values = [r["scores"][name] for r in id_results]
        return f"{np.median(values):.3f} (max {max(values):.3f})"

    site_windows = [judge(site_rows.sample(size, random_state=i)) for i in range(10)]

    def caught(key: str) -> str:
        return f"{sum(r[key] for r in site_windows)}/{len(site_windows)}"

    known = [d for d in delays if d is not None]
    known_alerts = [d for d in alert_delays if d is not None]
    label = (
        "QUICK-PROFILE model in a temporary project (not the real model)" if args.quick else "the project's champion"
    )
    lines = [
        f"\n## Drift monitoring — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}; model: {label}, v{version}; reference: {len(reference)} validation images",
        f"- windows of {size} predictions; alert after {persistence} drifting windows; drifting = "
        f"{' or '.join(policy.signals)}; thresholds: statistics {policy.stats_threshold} (share {policy.stats_share}), "
        f"embedding MMD {policy.embedding_threshold} on {policy.embedding_components} PCs, "
        f"class mix JS {policy.prediction_threshold}, confidence {policy.confidence_threshold}",
        f"- in-distribution: blood-cells TEST ({len(set(id_rows.cell))} cells x up to {args.copies} copies, one copy per cell per window); "
        f"new site: pbc-sample (400 images); embedding the pools {embed_s:.0f} s"
        + (f", training the quick model {train_s:.0f} s" if args.quick else "")
        + f"; {per_window_s:.1f} s per window check",
        "",
        "| | result | target |",
        "|---|---|---|",
        f"| false alarms: drifting windows in {len(id_results)} in-distribution windows | {rate('drifting')} | 0 |",
        f"| false alerts over those windows in sequence | {id_alerts} | 0 |",
        f"| false alarms before the switch in {args.trials} streams | {switch_alarms} | 0 |",
        f"| detection delay: new-site images until a window is flagged (median, max over {args.trials} streams) | "
        f"{np.median(known):.0f}, {max(known)}"
        + ("" if len(known) == len(delays) else f" ({len(delays) - len(known)} never flagged)")
        + " | <= 100 |"
        if known
        else "| detection delay | never flagged | <= 100 |",
        "| alert delay: new-site images until the alert (median, max) | "
        + (f"{np.median(known_alerts):.0f}, {max(known_alerts)}" if known_alerts else "never")
        + " | |",
        "",
        f"Per signal, on the same windows (flagged in-distribution windows; flagged pure new-site windows of {size}):",
        "",
        "| signal | in-distribution false alarms | new site caught | in-distribution score, median (max) |",
        "|---|---|---|---|",
        f"| image statistics (share of drifted statistics) | {rate('image_stats')} | {caught('image_stats')} | {spread('image_stats')} |",
        f"| embeddings: MMD on 20 PCs (the platform's) | {rate('embeddings')} | {caught('embeddings')} | {spread('embeddings')} |",
        f"| embeddings: Evidently's default (domain classifier, bootstrap) | {rate('evidently_default_embeddings')} | "
        f"{caught('evidently_default_embeddings')} | ROC AUC {spread('classifier_auc')} |",
        f"| predicted-class mix (Jensen-Shannon) | {rate('prediction')} | {caught('prediction')} | {spread('prediction')} |",
        f"| confidence (normed Wasserstein) | {rate('confidence')} | {caught('confidence')} | {spread('confidence')} |",
    ]
    record(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
