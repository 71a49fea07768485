"""Every path, URI and operational setting of the platform, in one place.

Values come from the environment (prefix ``HEMATOVISION_``) or a ``.env`` file in the working
directory, falling back to the embedded defaults below, so one machine runs everything and pointing
at the real thing (an MLflow server, another dataset download) is one variable away.
Machine-learning hyperparameters are not here: they live in ``params.yaml`` (see ``params.py``),
where DVC tracks them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Every tool in the stack phones home unless told not to (see ../shared/notes/stack.md).
# mlflow accepts DO_NOT_TRACK only as the literal "true".
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEMATOVISION_", env_file=".env", extra="ignore")

    project_dir: Path = Field(Path("."), description="Root of the project checkout; relative paths below hang from it.")
    data_source: Path = Field(
        Path("../shared/datasets/blood-cells"),
        description="Upstream training dataset in the Kaggle 'Blood Cell Images' layout (a download or a mount).",
    )
    new_site_source: Path = Field(
        Path("../shared/datasets/pbc-sample"),
        description="Images from a second laboratory (class-named folders), for cross-site evaluation.",
    )
    data_dir: Path = Field(Path("data"), description="DVC-tracked copy of the raw dataset (pinned by data.dvc).")
    prepared_dir: Path = Field(Path("prepared"), description="Output of the prepare stage: manifest, split, bad-image report.")
    models_dir: Path = Field(Path("models"), description="Output of the train stage: the trained model and its training report.")
    reports_dir: Path = Field(Path("reports"), description="Output of the evaluate stage: metrics and plots.")
    cache_dir: Path = Field(Path(".cache/embeddings"), description="Backbone embedding cache (keyed by image content and backbone).")
    mlflow_tracking_uri: str = Field(
        "sqlite:///mlruns/mlflow.db",
        description="MLflow tracking/registry store; MLFLOW_TRACKING_URI in the environment wins.",
    )
    mlflow_artifact_location: Path = Field(Path("mlruns/artifacts"), description="Where a new experiment stores artifacts.")
    experiment_name: str = Field("hematovision", description="MLflow experiment of training runs.")
    registered_model: str = Field("hematovision", description="Name of the model in the MLflow registry.")
    # --- serving and the prediction log -------------------------------------------------------
    serve_alias: str = Field("champion", description="Registry alias the service follows (and hot-swaps to when it moves).")
    alias_poll_seconds: float = Field(
        5.0, gt=0, description="How often each serving worker asks the registry where the alias points."
    )
    review_threshold: float = Field(
        0.7, ge=0, le=1, description="Predictions whose confidence is below this are flagged needs_review."
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest prediction request body accepted (413 above); bounds memory per request."
    )
    serve_threads: int = Field(
        32, gt=0, description="Requests one serving worker handles at once; they share model calls through the batcher (BentoML's default of 1 would serialise them)."
    )
    max_batch_images: int = Field(
        32, gt=0, description="Most images one model call takes when concurrent requests are batched together."
    )
    model_calls: int = Field(
        2, gt=0, description="Model calls one serving worker runs at once, each on cores / model_calls TensorFlow "
        "threads. On few cores one call spread over all of them stalls whenever request threads (decode, "
        "localisation, logging) take a core; independent calls keep every core busy (benchmarks/serving.py)."
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long a request waits for others to share its model call (adaptive batching; "
        "compare values with benchmarks/serving.py --batch-wait-ms)."
    )
    predictions_db: Path = Field(
        Path("monitoring/predictions.sqlite"), description="The prediction log (sqlite, WAL; shared by all serving workers)."
    )
    retain_images_days: int = Field(
        0, ge=0, description="Keep request images this many days under images_dir (0: never store images)."
    )
    images_dir: Path = Field(
        Path("monitoring/images"), description="Retained request images, content-addressed by sha256."
    )
    review_image_days: int = Field(
        30, ge=0, description="Keep the images of predictions flagged needs_review this many days: the review queue shows them (0: never)."
    )
    # --- people: accounts, review, corrections --------------------------------------------------
    lab_db: Path = Field(Path("monitoring/lab.sqlite"), description="Accounts, sessions, corrections and the audit log (sqlite, WAL).")
    corrections_images_dir: Path = Field(
        Path("monitoring/corrections"), description="Images of corrected predictions, content-addressed (kept: a correction needs its image)."
    )
    corrections_dataset_dir: Path = Field(
        Path("corrections"), description="Where `hematovision feedback export` writes the corrected images (tracked by corrections.dvc)."
    )
    retrain_dir: Path = Field(
        Path("retrain"), description="Output of the retraining flow: its manifest (raw data + corrections, with the holdout), report, challenger."
    )
    session_hours: float = Field(12.0, gt=0, description="How long a browser sign-in lasts.")
    predict_requires_token: bool = Field(
        False, description="Require a signed-in user or an API token for /predict, /predict_batch and /explain."
    )
    login_attempts: int = Field(5, gt=0, description="Failed sign-ins allowed per user and address within login_window_seconds.")
    login_window_seconds: float = Field(300.0, gt=0, description="Window of the sign-in rate limit.")
    # --- drift monitoring (drift.py, monitoring.py, flows/monitoring.py) ----------------------
    monitor_state_db: Path = Field(Path("monitoring/monitor.sqlite"), description="Monitoring state: windows checked, drift status, alerts (sqlite).")
    monitor_workspace: Path = Field(Path("monitoring/workspace"), description="Evidently workspace holding every window's snapshot (`hematovision monitor ui`).")
    monitor_reports_dir: Path = Field(Path("monitoring/reports"), description="Each window's Evidently report as HTML, linked from the ops page.")
    monitor_keep_reports: int = Field(500, gt=0, description="Newest window reports kept as HTML (~4 MB each; every window's snapshot stays in the workspace).")
    monitor_references_dir: Path = Field(Path("monitoring/references"), description="Local copies of each model version's reference profile (fetched from MLflow).")
    monitor_window: Literal["count", "time"] = Field("count", description="Windows of the prediction log: consecutive blocks of monitor_window_size predictions, or of monitor_window_minutes.")
    monitor_window_size: int = Field(50, ge=10, description="Predictions per window (count windows).")
    monitor_window_minutes: float = Field(60.0, gt=0, description="Length of a window (time windows).")
    monitor_min_window_size: int = Field(30, ge=10, description="A time window with fewer predictions is skipped (too few to judge).")
    monitor_max_windows_per_run: int = Field(20, gt=0, description="Most windows one monitoring run checks (the newest; older backlog is skipped).")
    reference_max_images: int = Field(400, gt=0, description="Images of the validation split profiled as a model version's reference.")
    drift_persistence: int = Field(2, gt=0, description="Consecutive drifting windows that raise a drift alert.")
    retrain_min_corrections: int = Field(200, gt=0, description="New corrections since the champion was registered that raise a retraining alert.")
    retrain_trigger: Literal["auto", "approval", "off"] = Field(
        "approval", description="On an alert: auto = run the retraining flow, approval = wait for an engineer's approval, off = only alert.")
    alert_webhook_url: str | None = Field(None, description="If set, every alert is POSTed there as JSON (never called when unset).")
    drift_stats_threshold: float = Field(1.0, gt=0, description="Normed Wasserstein distance (in reference standard deviations) above which an image statistic drifted.")
    drift_stats_share: float = Field(0.5, gt=0, le=1, description="Share of image statistics that must drift for the image-statistics signal.")
    drift_embedding_threshold: float = Field(0.05, gt=0, description="MMD (PCA of the embeddings, fitted on the reference) above which the embeddings drifted.")
    drift_embedding_components: int = Field(20, gt=0, description="PCA components of the embeddings the MMD compares.")
    drift_prediction_threshold: float = Field(0.3, gt=0, le=1, description="Jensen-Shannon distance of the predicted-class mix above which predictions drifted.")
    drift_confidence_threshold: float = Field(0.5, gt=0, description="Normed Wasserstein distance of the confidence above which confidence drifted.")
    drift_signals: list[Literal["image_stats", "embeddings", "prediction", "confidence"]] = Field(
        ["image_stats", "embeddings"], description="Signals that make a window drifting (the others are reported only).")

    def path(self, p: Path) -> Path:
        """Resolve a setting path against the project directory."""
        return p if p.is_absolute() else (self.project_dir / p).resolve()

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.mlflow_tracking_uri


@lru_cache
def get_settings() -> Settings:
    return Settings()


def quiet_environment() -> None:
    """Switch off telemetry and keep Keras' home inside the project; call before importing the tools."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("KERAS_HOME", str(Path(".keras").resolve()))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # mlflow draws a progress bar per artifact download; in a server log that is noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
