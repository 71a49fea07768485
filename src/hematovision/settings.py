"""Every path, URI and operational setting of the platform, in one place, grouped by who reads it.

Values come from the environment (``HEMATOVISION_<NAME>``) or a ``.env`` file in the working
directory, falling back to the embedded defaults below, so one machine runs everything and pointing
at the real thing (an MLflow server, another dataset download) is one variable away. The groups are
``paths``, ``registry``, ``serving``, ``lab``, ``monitoring``, ``drift`` and ``deploy``; each field's
environment variable is the one it had before the grouping (``settings.monitoring.window_size`` is
``HEMATOVISION_MONITOR_WINDOW_SIZE``), and a ``HEMATOVISION_*`` variable that names no setting is an
error that names the closest one, so a typo never falls back to a default silently.
Machine-learning hyperparameters are not here: they live in ``params.yaml`` (see ``params.py``),
where DVC tracks them.
"""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field
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
ENV_PREFIX = "HEMATOVISION_"


def _config(prefix: str = ENV_PREFIX) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, env_file=".env", extra="ignore", populate_by_name=True)


def _env(name: str) -> AliasChoices:
    """A field whose variable does not follow its group's prefix (the name it always had). Only the
    prefixed name: a bare ``RETRAIN_TRIGGER`` left in a shell by another tool must not reach us
    (``populate_by_name`` still lets code pass the field by its own name)."""
    return AliasChoices(ENV_PREFIX + name.upper())


class PathSettings(BaseSettings):
    """Folders and upstream sources; relative paths hang from ``project_dir``."""

    model_config = _config()

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
    prepared_dir: Path = Field(
        Path("prepared"), description="Output of the prepare stage: manifest, split, bad-image report."
    )
    models_dir: Path = Field(
        Path("models"), description="Output of the train stage: the trained model and its training report."
    )
    reports_dir: Path = Field(Path("reports"), description="Output of the evaluate stage: metrics and plots.")
    cache_dir: Path = Field(
        Path(".cache/embeddings"), description="Backbone embedding cache (keyed by image content and backbone)."
    )
    embedding_cache_days: int = Field(
        0,
        ge=0,
        description="Delete backbone embeddings of images (training images and corrections) not used for this "
        "many days from the embedding cache, at each retention pass; a deleted one is recomputed when needed "
        "(0: kept).",
    )
    retrain_dir: Path = Field(
        Path("retrain"),
        description="Output of the retraining flow: its manifest (raw data + corrections, with the holdout), report, challenger.",
    )
    corrections_dataset_dir: Path = Field(
        Path("corrections"),
        description="Where `hematovision feedback export` writes the corrected images (tracked by corrections.dvc).",
    )
    dvc_remote: str = Field(
        "",
        description="DVC remote that `hematovision data push` sends data.dvc's and every corrections.dvc version's "
        "content to and `data pull` fetches from: a folder (a shared mount) or any URL DVC supports (s3://, "
        "ssh://, ...); empty: no remote, the data lives in this checkout's DVC cache only.",
    )


class RegistrySettings(BaseSettings):
    """The MLflow tracking store and the registered model the platform serves."""

    model_config = _config()

    mlflow_tracking_uri: str = Field(
        "sqlite:///mlruns/mlflow.db",
        description="MLflow tracking/registry store; MLFLOW_TRACKING_URI in the environment wins.",
    )
    mlflow_artifact_location: Path = Field(
        Path("mlruns/artifacts"), description="Where a new experiment stores artifacts."
    )
    experiment_name: str = Field("hematovision", description="MLflow experiment of training runs.")
    registered_model: str = Field("hematovision", description="Name of the model in the MLflow registry.")


class ServingSettings(BaseSettings):
    """The service: which alias it follows, how it batches, and the prediction log it writes."""

    model_config = _config()

    alias: str = Field(
        "champion",
        validation_alias=_env("serve_alias"),
        description="Registry alias the service follows (and hot-swaps to when it moves).",
    )
    alias_poll_seconds: float = Field(
        5.0, gt=0, description="How often each serving worker asks the registry where the alias points."
    )
    review_threshold: float = Field(
        0.7, ge=0, le=1, description="Predictions whose confidence is below this are flagged needs_review."
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest prediction request body accepted (413 above); bounds memory per request.",
    )
    threads: int = Field(
        32,
        gt=0,
        validation_alias=_env("serve_threads"),
        description="Requests one serving worker handles at once; they share model calls through the batcher (BentoML's default of 1 would serialise them).",
    )
    workers: int = Field(
        1,
        gt=0,
        validation_alias=_env("serve_workers"),
        description="Serving worker processes per replica (`hematovision serve`), each with its own model copy, "
        "alias watcher and batcher; they share the prediction log, the lab database and the registry.",
    )
    max_request_pixels: int = Field(
        100_000_000,
        gt=0,
        description="Decoded pixels one request may hold across all its images (413 above): "
        "with max_request_bytes it bounds the memory one request can take.",
    )
    max_batch_images: int = Field(
        32, gt=0, description="Most images one model call takes when concurrent requests are batched together."
    )
    model_calls: int = Field(
        2,
        gt=0,
        description="Model calls one serving worker runs at once, each on cores / model_calls TensorFlow "
        "threads. On few cores one call spread over all of them stalls whenever request threads (decode, "
        "localisation, logging) take a core; independent calls keep every core busy (benchmarks/serving.py).",
    )
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        description="How long a request waits for others to share its model call (adaptive batching; "
        "compare values with benchmarks/serving.py --batch-wait-ms).",
    )
    predictions_db: Path = Field(
        Path("monitoring/predictions.sqlite"),
        description="The prediction log (sqlite, WAL; shared by all serving workers).",
    )
    retain_images_days: int = Field(
        0, ge=0, description="Keep request images this many days under images_dir (0: never store images)."
    )
    images_dir: Path = Field(
        Path("monitoring/images"), description="Retained request images, content-addressed by sha256."
    )
    review_image_days: int = Field(
        30,
        ge=0,
        description="Keep the images of predictions flagged needs_review this many days: the review queue shows them (0: never).",
    )
    embedding_days: int = Field(
        90,
        ge=0,
        description="Keep the backbone embedding of a logged prediction this many days (the rest of the row stays); "
        "longer than any drift monitoring window (0: kept).",
    )
    images_budget_mb: float = Field(
        1024.0,
        ge=0,
        description="Disk budget of the retained request images: beyond it the oldest are purged first, whatever "
        "their retention (0: no budget).",
    )
    purge_interval_minutes: float = Field(
        60.0,
        ge=0,
        description="How often each serving worker runs a retention pass (images, embeddings, corrections, the "
        "embedding cache; as `hematovision predictions purge` does); several at once are harmless (0: only by hand).",
    )


class LabSettings(BaseSettings):
    """People: accounts, sign-in, and the corrections they make."""

    model_config = _config()

    database_url: str = Field(
        "",
        validation_alias=_env("database_url"),
        description="Lab mode's shared database: a postgresql+psycopg://user:password@host/db URL holds the lab "
        "database, the prediction log and the monitoring state for every host (empty: the sqlite files lab_db, "
        "serving.predictions_db and monitoring.state_db, the embedded mode).",
    )
    lab_db: Path = Field(
        Path("monitoring/lab.sqlite"), description="Accounts, sessions, corrections and the audit log (sqlite, WAL)."
    )
    corrections_images_dir: Path = Field(
        Path("monitoring/corrections"),
        description="Images of corrected predictions, content-addressed (kept: a correction needs its image).",
    )
    correction_image_days: int = Field(
        0,
        ge=0,
        description="Delete a correction's image, and its copy in the exported corrections folder, this many days "
        "after its last correction; the lab decides: a correction is training data, and one without its image "
        "leaves the next export (0: kept).",
    )
    cell_types: list[str] = Field(
        ["basophil", "immature granulocyte", "erythroblast", "platelet", "smudge cell", "artefact", "other"],
        description="Cell types a pathologist may answer with besides the model's classes (the laboratory's "
        "vocabulary, lower case); a type with enough agreed corrections becomes a class at the next retraining.",
    )
    new_class_min_corrections: int = Field(
        50,
        gt=0,
        description="Agreed corrections of a type outside the model's classes before retraining adds it as a class.",
    )
    session_hours: float = Field(12.0, gt=0, description="How long a browser sign-in lasts.")
    predict_requires_token: bool = Field(
        True,
        description="Predicting needs a signed-in user or an API token; set false only to open predictions "
        "to anyone, e.g. a public demo.",
    )
    login_attempts: int = Field(
        5, gt=0, description="Failed sign-ins allowed per user and address within login_window_seconds."
    )
    login_window_seconds: float = Field(300.0, gt=0, description="Window of the sign-in rate limit.")
    session_idle_minutes: float = Field(
        30.0, gt=0, description="A browser sign-in unused this long ends (session_hours caps it in any case)."
    )
    token_days: float = Field(90.0, gt=0, description="How long a new API token is valid.")
    max_form_bytes: int = Field(
        64 * 1024,
        gt=0,
        description="Largest sign-in, JSON or form body of the lab's routes (413 above), read only "
        "after the caller is known where the route needs one.",
    )
    trusted_proxies: list[str] = Field(
        [],
        description="Addresses of reverse proxies whose X-Forwarded-For names the client (none: the peer "
        "address is the client, whatever the header says).",
    )


class MonitoringSettings(BaseSettings):
    """The drift monitor's windows, state, reports, and what an alert does (``HEMATOVISION_MONITOR_*``)."""

    model_config = _config(ENV_PREFIX + "MONITOR_")

    state_db: Path = Field(
        Path("monitoring/monitor.sqlite"),
        description="Monitoring state: windows checked, drift status, alerts (sqlite).",
    )
    workspace: Path = Field(
        Path("monitoring/workspace"),
        description="Evidently workspace holding every window's snapshot (`hematovision monitor ui`).",
    )
    workspace_url: str = Field(
        "",
        description="Lab mode: the http(s) URL of an Evidently UI service (`evidently ui`) that every window's "
        "snapshot is also sent to, where ops open them from their own machine (empty: the local workspace only).",
    )
    reports_dir: Path = Field(
        Path("monitoring/reports"), description="Each window's Evidently report as HTML, linked from the ops page."
    )
    keep_reports: int = Field(
        500,
        gt=0,
        description="Newest window reports kept as HTML (each inlines Evidently's viewer; every window's snapshot stays in the workspace).",
    )
    references_dir: Path = Field(
        Path("monitoring/references"),
        description="Local copies of each model version's reference profile (fetched from MLflow).",
    )
    window: Literal["count", "time"] = Field(
        "count",
        description="Windows of the prediction log: consecutive blocks of window_size predictions, or of window_minutes.",
    )
    window_size: int = Field(50, ge=10, description="Predictions per window (count windows).")
    window_minutes: float = Field(60.0, gt=0, description="Length of a window (time windows).")
    min_window_size: int = Field(
        30, ge=10, description="A time window with fewer predictions is skipped (too few to judge)."
    )
    max_windows_per_run: int = Field(
        20, gt=0, description="Most windows one monitoring run checks (the newest; older backlog is skipped)."
    )
    reference_max_images: int = Field(
        400,
        gt=0,
        validation_alias=_env("reference_max_images"),
        description="Images of the validation split profiled as a model version's reference.",
    )
    retrain_min_corrections: int = Field(
        200,
        gt=0,
        validation_alias=_env("retrain_min_corrections"),
        description="New corrections since the champion was registered that raise a retraining alert.",
    )
    retrain_trigger: Literal["auto", "approval", "off"] = Field(
        "approval",
        validation_alias=_env("retrain_trigger"),
        description="On an alert: auto = run the retraining flow, approval = wait for an engineer's approval, off = only alert.",
    )
    alert_webhook_url: str | None = Field(
        None,
        validation_alias=_env("alert_webhook_url"),
        description="If set, every alert is POSTed there as JSON (never called when unset).",
    )


class DriftSettings(BaseSettings):
    """When a window of predictions counts as drifting (``HEMATOVISION_DRIFT_*``)."""

    model_config = _config(ENV_PREFIX + "DRIFT_")

    persistence: int = Field(2, gt=0, description="Consecutive drifting windows that raise a drift alert.")
    stats_threshold: float = Field(
        1.0,
        gt=0,
        description="Normed Wasserstein distance (in reference standard deviations) above which an image statistic drifted.",
    )
    stats_share: float = Field(
        0.5, gt=0, le=1, description="Share of image statistics that must drift for the image-statistics signal."
    )
    embedding_threshold: float = Field(
        0.05,
        gt=0,
        description="MMD (PCA of the embeddings, fitted on the reference) above which the embeddings drifted.",
    )
    embedding_components: int = Field(20, gt=0, description="PCA components of the embeddings the MMD compares.")
    prediction_threshold: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Jensen-Shannon distance of the predicted-class mix above which predictions drifted.",
    )
    confidence_threshold: float = Field(
        0.5, gt=0, description="Normed Wasserstein distance of the confidence above which confidence drifted."
    )
    signals: list[Literal["image_stats", "embeddings", "prediction", "confidence"]] = Field(
        ["image_stats", "embeddings"], description="Signals that make a window drifting (the others are reported only)."
    )


class DeploySettings(BaseSettings):
    """Lab mode's Prefect deployments: where flow runs execute and when (``HEMATOVISION_DEPLOY_*``;
    ``hematovision deploy`` registers them on the Prefect server that ``PREFECT_API_URL`` names)."""

    model_config = _config(ENV_PREFIX + "DEPLOY_")

    work_pool: str = Field(
        "hematovision-cpu",
        description="Prefect work pool (type process) whose workers run drift monitoring and the retention purge, "
        "and training and retraining unless training_work_pool names another.",
    )
    training_work_pool: str = Field(
        "",
        description="Work pool of the training and retraining deployments, e.g. workers on a GPU machine "
        "(empty: work_pool).",
    )
    source: str = Field(
        "",
        description="Where a worker finds the project's code for a flow run: a git URL it clones, or a folder "
        "on the worker's machine (empty: project_dir, the same path on every worker).",
    )
    monitoring_cron: str = Field(
        "*/15 * * * *", description="When the drift-monitoring deployment runs (cron, in timezone)."
    )
    purge_cron: str = Field("7 * * * *", description="When the retention-purge deployment runs (cron, in timezone).")
    timezone: str = Field("UTC", description="Time zone of the deployments' cron schedules.")
    retrain_on_worker: bool = Field(
        False,
        description="The monitor starts retraining (automatic, or approved by an engineer) as a run of the "
        "retraining deployment, executed by a worker, never in its own process; needs PREFECT_API_URL and "
        "`hematovision deploy` (false: the retraining flow runs inside the monitoring run, the embedded mode).",
    )
    heartbeat_seconds: int = Field(
        60,
        ge=30,  # Prefect's least heartbeat period
        description="How often a flow run on a worker reports that it is alive. A run silent for "
        "3 heartbeats (its worker or machine died) is marked Crashed, which frees its one-at-a-time slot.",
    )


GROUPS: dict[str, type[BaseSettings]] = {
    "paths": PathSettings,
    "registry": RegistrySettings,
    "serving": ServingSettings,
    "lab": LabSettings,
    "monitoring": MonitoringSettings,
    "drift": DriftSettings,
    "deploy": DeploySettings,
}


class Settings(BaseModel):
    """The platform's settings, one group per part of the lifecycle (each read from the environment)."""

    paths: PathSettings = Field(default_factory=PathSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    lab: LabSettings = Field(default_factory=LabSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)

    def path(self, p: Path) -> Path:
        """Resolve a setting path against the project directory."""
        return p if p.is_absolute() else (self.paths.project_dir / p).resolve()

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.registry.mlflow_tracking_uri

    def with_changes(self, **groups: dict[str, Any]) -> Settings:
        """A copy with some fields changed, e.g. ``with_changes(monitoring={"window_size": 20})``."""
        update = {}
        for group, values in groups.items():
            if group not in GROUPS:
                raise ValueError(f"no settings group {group!r} (groups: {', '.join(GROUPS)})")
            update[group] = getattr(self, group).model_copy(update=values)
        return self.model_copy(update=update)


def environment_names() -> dict[str, str]:
    """Every environment variable a setting reads -> ``group.field``."""
    names = {}
    for group, cls in GROUPS.items():
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            env = alias.choices[0] if isinstance(alias, AliasChoices) else prefix + name
            names[str(env).upper()] = f"{group}.{name}"
    return names


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Refuse ``HEMATOVISION_*`` variables that no setting reads, naming the closest known one."""
    known = environment_names()
    for key in sorted(environ if environ is not None else os.environ):
        name = key.upper()
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]} ({known[close[0]]})?" if close else ""
            raise ValueError(f"environment variable {key} is not a HematoVision setting{hint}")


@lru_cache
def get_settings() -> Settings:
    check_environment()
    return Settings()


def quiet_environment() -> None:
    """Switch off telemetry and keep Keras' home inside the project; call before importing the tools."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("KERAS_HOME", str(Path(".keras").resolve()))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # mlflow draws a progress bar per artifact download; in a server log that is noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The embedded mode starts Prefect's API in a subprocess per flow; Prefect gives it 20 s, which a
    # 2-core machine busy training (or running the test suite) overruns, failing the whole flow.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
