"""Drift of the images a model sees: its reference profile, and one window checked against it.

**Reference.** When a model is evaluated, :func:`log_reference` profiles up to
``monitoring.reference_max_images`` images of the validation split (held-out cells: what the model has not
trained on, as production images will be) exactly as the service profiles a request: the
training decoder, :func:`hematovision.data.imaging.image_stats`, the crop -> backbone -> head with its
test-time views, the embedding of the crop as it is. The rows (image statistics, predicted class,
confidence, embedding) and a summary go to the training run in MLflow under
``monitoring/reference``, so the registered version that points at the run carries its reference
and the monitor fetches the champion's by version (:func:`fetch_reference`).

**A window** of the prediction log is compared with the reference in one Evidently report
(:func:`check_window`), four signals:

* ``image_stats``: normed Wasserstein distance per statistic (brightness, saturation, hue,
  sharpness, dark share, width, height); drift when at least ``drift.stats_share`` of them pass
  ``drift.stats_threshold``. A distance, not a p-value: with a few hundred reference rows a test
  rejects for shifts nobody cares about, and augmented copies of few cells make rows dependent;
* ``embeddings``: Evidently's ``EmbeddingsDrift`` with the MMD method (kernel two-sample statistic,
  median-distance bandwidth) on a PCA projection fitted on the reference
  (``drift.embedding_components``). 1280 dimensions against a window of ~50 rows rule out
  per-dimension tests (multiple testing), and Evidently's default, a domain classifier whose ROC
  AUC is measured on half of the rows against a bootstrap of random AUCs, is noisy at this size:
  it raised false alarms on in-distribution windows where MMD raised none, and MMD separates the
  new site from in-distribution windows by an order of magnitude (``benchmarks/drift.py``; the
  figures are in ``benchmarks/RESULTS.md``);
* ``prediction``: Jensen-Shannon distance of the predicted-class mix;
* ``confidence``: normed Wasserstein distance of the confidence.

Which signals make a window *drifting* is a setting (``drift.signals``), by default the two about
the input. The output signals say more about the model than about the images: the class mix
moves with the lab's case mix (a haematology ward sends more lymphocytes), and the model is less
sure on new cells of its own lab (TEST) than on its validation cells, so the confidence signal
flags most in-distribution windows (``benchmarks/drift.py``). They are computed, charted and shown
beside the others.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hematovision import stores
from hematovision.data.imaging import image_stats, load_rgb
from hematovision.data.localize import crop_wbc
from hematovision.settings import Settings

STAT_COLUMNS = ("brightness", "saturation", "hue", "sharpness", "dark_fraction", "width", "height")
SIGNALS = ("image_stats", "embeddings", "prediction", "confidence")
REFERENCE_ARTIFACT = "monitoring/reference"
REFERENCE_FILE = "reference.parquet"
PROFILE_FILE = "profile.json"
EMBEDDING = "embedding"


def embedding_columns(dim: int) -> list[str]:
    return [f"emb_{i}" for i in range(dim)]


def profile_frame(
    stats: Sequence[dict[str, float]],
    labels: Sequence[str],
    confidences: Sequence[float],
    embeddings: np.ndarray,
    extra: dict[str, Sequence] | None = None,
) -> pd.DataFrame:
    """The one row layout of references and windows: statistics, label, confidence, emb_0..emb_n."""
    frame = pd.DataFrame([{c: float(s.get(c, np.nan)) for c in STAT_COLUMNS} for s in stats])
    frame["label"] = list(labels)
    frame["confidence"] = np.asarray(confidences, dtype=np.float64)
    emb = np.asarray(embeddings, dtype=np.float32).reshape(len(frame), -1)
    frame = pd.concat([frame, pd.DataFrame(emb, columns=embedding_columns(emb.shape[1]))], axis=1)
    for name, values in (extra or {}).items():
        frame[name] = list(values)
    return frame


# --- the reference profile ---------------------------------------------------------------------
def build_reference(classifier, image_paths: Sequence[Path], batch_size: int = 32) -> pd.DataFrame:
    """Profile images exactly as the service profiles a request (see ``serving.prepare_image``)."""
    size = classifier.config.image_size
    stats, labels, confidences, embeddings = [], [], [], []
    for start in range(0, len(image_paths), batch_size):
        crops = []
        for path in image_paths[start : start + batch_size]:
            rgb = load_rgb(path)
            stats.append(image_stats(rgb))
            crops.append(crop_wbc(np.asarray(rgb), size))
        answers = classifier.predict_answers(np.stack(crops))
        labels += answers.labels(classifier.classes)  # "unknown" where the service would say it
        confidences += list(answers.probabilities.max(axis=1))
        embeddings.append(answers.embeddings)
    return profile_frame(stats, labels, confidences, np.concatenate(embeddings))


def reference_images(manifest: pd.DataFrame, image_root: Path, max_images: int, seed: int) -> list[Path]:
    """Up to ``max_images`` of the validation split, spread over its cells (one copy per cell
    first, then further copies), so few cells with many augmented copies do not dominate."""
    rows = manifest[manifest.split == "val"]
    if rows.empty:
        rows = manifest[manifest.split == "train"]
    rows = rows.sample(frac=1.0, random_state=seed)
    rows = rows.assign(_copy=rows.groupby("group").cumcount()).sort_values("_copy", kind="stable")
    return [image_root / p for p in rows.path.head(max_images)]


def summarize(reference: pd.DataFrame) -> dict[str, Any]:
    """A readable summary of a reference (the rows are what the checks use)."""
    emb = reference[[c for c in reference.columns if c.startswith("emb_")]].to_numpy(np.float32)
    norms = np.linalg.norm(emb, axis=1) if len(emb) else np.zeros(0)
    return {
        "n_images": int(len(reference)),
        "image_stats": {
            c: {
                "mean": float(reference[c].mean()),
                "std": float(reference[c].std(ddof=0)),
                "p05": float(reference[c].quantile(0.05)),
                "p95": float(reference[c].quantile(0.95)),
            }
            for c in STAT_COLUMNS
        },
        "class_mix": {k: float(v) for k, v in reference.label.value_counts(normalize=True).sort_index().items()},
        "confidence": {"mean": float(reference.confidence.mean()), "p05": float(reference.confidence.quantile(0.05))},
        "embedding": {
            "dim": int(emb.shape[1]) if emb.ndim == 2 else 0,
            "norm_mean": float(norms.mean()) if len(norms) else 0.0,
            "norm_std": float(norms.std()) if len(norms) else 0.0,
        },
    }


def save_reference(reference: pd.DataFrame, directory: Path, info: dict[str, Any] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    reference.to_parquet(directory / REFERENCE_FILE, index=False)
    (directory / PROFILE_FILE).write_text(json.dumps({**(info or {}), **summarize(reference)}, indent=2))
    return directory


def load_reference(directory: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(directory) / REFERENCE_FILE)


def log_reference(
    classifier, manifest: pd.DataFrame, image_root: Path, work_dir: Path, max_images: int, seed: int
) -> dict[str, Any]:
    """Profile the validation split and log it to the active MLflow run (``monitoring/reference``)."""
    import mlflow

    paths = reference_images(manifest, image_root, max_images, seed)
    reference = build_reference(classifier, paths)
    directory = save_reference(reference, work_dir / "reference", {"source": "validation split"})
    mlflow.log_artifacts(str(directory), REFERENCE_ARTIFACT)
    return json.loads((directory / PROFILE_FILE).read_text())


def fetch_reference(settings: Settings, version: str) -> pd.DataFrame:
    """The reference of a registered version, from its run's artifacts (cached locally by version)."""
    local = settings.path(settings.monitoring.references_dir) / f"v{version}"
    if not (local / REFERENCE_FILE).exists():
        import mlflow

        run_id = stores.registry(settings).get_version(version).run_id
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=REFERENCE_ARTIFACT, tracking_uri=settings.tracking_uri
            )
        )
        if not (downloaded / REFERENCE_FILE).exists():
            raise FileNotFoundError(
                f"model version {version} (run {run_id}) has no {REFERENCE_ARTIFACT}: "
                "it was trained before references were recorded; re-run its evaluate step"
            )
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(downloaded, tmp)
        shutil.rmtree(local, ignore_errors=True)
        tmp.rename(local)
    return load_reference(local)


# --- checking one window -----------------------------------------------------------------------
@dataclass(frozen=True)
class DriftPolicy:
    """Thresholds of the four signals and which of them make a window drifting."""

    stats_threshold: float = 1.0
    stats_share: float = 0.5
    embedding_threshold: float = 0.05
    embedding_components: int = 20
    prediction_threshold: float = 0.3
    confidence_threshold: float = 0.5
    signals: tuple[str, ...] = ("image_stats", "embeddings")

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftPolicy:
        return cls(
            settings.drift.stats_threshold,
            settings.drift.stats_share,
            settings.drift.embedding_threshold,
            settings.drift.embedding_components,
            settings.drift.prediction_threshold,
            settings.drift.confidence_threshold,
            tuple(settings.drift.signals),
        )


@dataclass
class WindowCheck:
    drifting: bool
    signals: dict[str, dict[str, Any]]
    snapshot: Any = field(repr=False, default=None)  # evidently Snapshot

    def summary(self) -> dict[str, Any]:
        return {"drifting": self.drifting, "signals": self.signals}


def check_window(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    policy: DriftPolicy,
    timestamp: datetime | None = None,
    name: str | None = None,
    tags: Sequence[str] = (),
) -> WindowCheck:
    """Run the Evidently report of ``current`` against ``reference``; decide each signal."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import MMDDriftMethod
    from evidently.presets import DataDriftPreset

    emb_cols = [c for c in reference.columns if c.startswith("emb_")]
    if [c for c in current.columns if c.startswith("emb_")] != emb_cols:
        raise ValueError("the window's embeddings do not have the reference's dimension (another backbone?)")
    # The projection is fitted on the reference alone, so every window is seen in the same
    # coordinates; Evidently then gets a few components instead of 1280 columns, which it is far
    # slower on.
    ref_pcs, cur_pcs = project_embeddings(
        reference[emb_cols].to_numpy(np.float32), current[emb_cols].to_numpy(np.float32), policy.embedding_components
    )
    pc_cols = [f"pc_{i}" for i in range(ref_pcs.shape[1])]
    columns = [*STAT_COLUMNS, "label", "confidence"]
    definition = DataDefinition(
        numerical_columns=[*STAT_COLUMNS, "confidence"], categorical_columns=["label"], embeddings={EMBEDDING: pc_cols}
    )
    ref = Dataset.from_pandas(
        pd.concat([reference[columns].reset_index(drop=True), pd.DataFrame(ref_pcs, columns=pc_cols)], axis=1),
        data_definition=definition,
    )
    cur = Dataset.from_pandas(
        pd.concat([current[columns].reset_index(drop=True), pd.DataFrame(cur_pcs, columns=pc_cols)], axis=1),
        data_definition=definition,
    )
    report = Report(
        [
            DataDriftPreset(
                columns=list(STAT_COLUMNS),
                method="wasserstein",
                threshold=policy.stats_threshold,
                drift_share=policy.stats_share,
            ),
            EmbeddingsDrift(
                embeddings_name=EMBEDDING, drift_method=MMDDriftMethod(threshold=policy.embedding_threshold)
            ),
            ValueDrift(column="label", method="jensenshannon", threshold=policy.prediction_threshold),
            ValueDrift(column="confidence", method="wasserstein", threshold=policy.confidence_threshold),
        ],
        include_tests=True,
    )
    with _first_components_plot():
        snapshot = report.run(cur, ref, timestamp=timestamp, name=name, tags=list(tags))
    signals = signals_of(snapshot.dict(), policy)
    drifting = any(signals[s]["drift"] for s in policy.signals if s in signals)
    return WindowCheck(drifting, signals, snapshot)


class _FirstTwoComponents:
    """Stands in for t-SNE in Evidently's embedding-drift plot: the columns it gets are already
    principal components of the reference, so the first two are a faithful 2-D view. Evidently
    runs a 1000-iteration t-SNE for that plot alone, the slowest part of a window's report."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def fit_transform(self, data) -> np.ndarray:
        values = np.asarray(data, dtype=np.float64)
        return values[:, :2] if values.shape[1] >= 2 else np.hstack([values, np.zeros((len(values), 1))])


_plot_lock = threading.Lock()


@contextmanager
def _first_components_plot():
    from evidently.legacy.metrics.data_drift import embeddings_drift

    with _plot_lock, warnings.catch_warnings():
        # Constant columns (every image of a lab has one size) make numpy warn inside Evidently's
        # correlation plots; the drift scores handle them (a zero spread is floored).
        warnings.simplefilter("ignore", RuntimeWarning)
        original, embeddings_drift.TSNE = embeddings_drift.TSNE, _FirstTwoComponents
        try:
            yield
        finally:
            embeddings_drift.TSNE = original


def project_embeddings(reference: np.ndarray, current: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA fitted on the reference embeddings, applied to both (at most n_reference - 1 components)."""
    from sklearn.decomposition import PCA

    n = max(1, min(components, len(reference) - 1, reference.shape[1]))
    pca = PCA(n_components=n, random_state=0).fit(reference)
    return pca.transform(reference), pca.transform(current)


def signals_of(snapshot: dict[str, Any], policy: DriftPolicy) -> dict[str, dict[str, Any]]:
    """The four signals' scores and decisions, read from an Evidently snapshot's ``dict()``."""
    signals: dict[str, dict[str, Any]] = {}
    per_column: dict[str, float] = {}
    for metric in snapshot["metrics"]:
        config, value = metric["config"], metric["value"]
        kind = config["type"].rsplit(":", 1)[-1]
        if kind == "DriftedColumnsCount":
            share = float(value["share"])
            signals["image_stats"] = {
                "score": share,
                "threshold": policy.stats_share,
                "drift": share >= policy.stats_share,
                "method": f"share of statistics with normed Wasserstein >= {policy.stats_threshold}",
            }
        elif kind == "EmbeddingsDrift":
            score = float(value)
            signals["embeddings"] = {
                "score": score,
                "threshold": policy.embedding_threshold,
                "drift": score > policy.embedding_threshold,
                "method": "MMD on PCA of the reference",
            }
        elif kind == "ValueDrift" and config["column"] == "label":
            signals["prediction"] = {
                "score": float(value),
                "threshold": policy.prediction_threshold,
                "drift": float(value) >= policy.prediction_threshold,
                "method": "Jensen-Shannon distance",
            }
        elif kind == "ValueDrift" and config["column"] == "confidence":
            signals["confidence"] = {
                "score": float(value),
                "threshold": policy.confidence_threshold,
                "drift": float(value) >= policy.confidence_threshold,
                "method": "normed Wasserstein",
            }
        elif kind == "ValueDrift":
            per_column[config["column"]] = float(value)
    if "image_stats" in signals:
        signals["image_stats"]["columns"] = per_column
    return signals


def policy_dict(policy: DriftPolicy) -> dict[str, Any]:
    return asdict(policy)
