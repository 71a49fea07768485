"""The grouped settings read the environment exactly as the flat ones did before the grouping.

``OLD_VARIABLES`` is every variable the flat ``Settings`` read (commit 6fbce92: ``HEMATOVISION_`` and
the field's name upper-cased), with a valid value that is not the default and the group and field
that now carry it. A deployment's environment, or its ``.env``, keeps working unchanged; a
misspelt ``HEMATOVISION_*`` variable is an error naming the setting it probably meant.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hematovision.settings import ENV_PREFIX, Settings, check_environment, environment_names, get_settings

OLD_VARIABLES: dict[str, tuple[str, str, object]] = {
    # variable: (group.field, value in the environment, value in the settings)
    "HEMATOVISION_PROJECT_DIR": ("paths.project_dir", "/srv/hv", Path("/srv/hv")),
    "HEMATOVISION_DATA_SOURCE": ("paths.data_source", "/mnt/blood-cells", Path("/mnt/blood-cells")),
    "HEMATOVISION_NEW_SITE_SOURCE": ("paths.new_site_source", "/mnt/pbc", Path("/mnt/pbc")),
    "HEMATOVISION_DATA_DIR": ("paths.data_dir", "raw", Path("raw")),
    "HEMATOVISION_PREPARED_DIR": ("paths.prepared_dir", "out/prepared", Path("out/prepared")),
    "HEMATOVISION_MODELS_DIR": ("paths.models_dir", "out/models", Path("out/models")),
    "HEMATOVISION_REPORTS_DIR": ("paths.reports_dir", "out/reports", Path("out/reports")),
    "HEMATOVISION_CACHE_DIR": ("paths.cache_dir", "/var/cache/hv", Path("/var/cache/hv")),
    "HEMATOVISION_MLFLOW_TRACKING_URI": (
        "registry.mlflow_tracking_uri",
        "http://mlflow.lab:5000",
        "http://mlflow.lab:5000",
    ),
    "HEMATOVISION_MLFLOW_ARTIFACT_LOCATION": (
        "registry.mlflow_artifact_location",
        "/srv/artifacts",
        Path("/srv/artifacts"),
    ),
    "HEMATOVISION_EXPERIMENT_NAME": ("registry.experiment_name", "wbc", "wbc"),
    "HEMATOVISION_REGISTERED_MODEL": ("registry.registered_model", "wbc-classifier", "wbc-classifier"),
    "HEMATOVISION_SERVE_ALIAS": ("serving.alias", "staging", "staging"),
    "HEMATOVISION_ALIAS_POLL_SECONDS": ("serving.alias_poll_seconds", "2.5", 2.5),
    "HEMATOVISION_REVIEW_THRESHOLD": ("serving.review_threshold", "0.42", 0.42),
    "HEMATOVISION_MAX_REQUEST_BYTES": ("serving.max_request_bytes", "1234567", 1234567),
    "HEMATOVISION_SERVE_THREADS": ("serving.threads", "7", 7),
    "HEMATOVISION_MAX_BATCH_IMAGES": ("serving.max_batch_images", "9", 9),
    "HEMATOVISION_MODEL_CALLS": ("serving.model_calls", "3", 3),
    "HEMATOVISION_BATCH_WAIT_MS": ("serving.batch_wait_ms", "12.5", 12.5),
    "HEMATOVISION_PREDICTIONS_DB": (
        "serving.predictions_db",
        "/srv/predictions.sqlite",
        Path("/srv/predictions.sqlite"),
    ),
    "HEMATOVISION_RETAIN_IMAGES_DAYS": ("serving.retain_images_days", "3", 3),
    "HEMATOVISION_IMAGES_DIR": ("serving.images_dir", "/srv/images", Path("/srv/images")),
    "HEMATOVISION_REVIEW_IMAGE_DAYS": ("serving.review_image_days", "11", 11),
    "HEMATOVISION_LAB_DB": ("lab.lab_db", "/srv/lab.sqlite", Path("/srv/lab.sqlite")),
    "HEMATOVISION_DATABASE_URL": (
        "lab.database_url",
        "postgresql+psycopg://lab@db/hematovision",
        "postgresql+psycopg://lab@db/hematovision",
    ),
    "HEMATOVISION_CORRECTIONS_IMAGES_DIR": ("lab.corrections_images_dir", "/srv/corrected", Path("/srv/corrected")),
    "HEMATOVISION_CORRECTIONS_DATASET_DIR": ("paths.corrections_dataset_dir", "feedback", Path("feedback")),
    "HEMATOVISION_RETRAIN_DIR": ("paths.retrain_dir", "out/retrain", Path("out/retrain")),
    "HEMATOVISION_SESSION_HOURS": ("lab.session_hours", "6.5", 6.5),
    "HEMATOVISION_PREDICT_REQUIRES_TOKEN": ("lab.predict_requires_token", "false", False),
    "HEMATOVISION_LOGIN_ATTEMPTS": ("lab.login_attempts", "8", 8),
    "HEMATOVISION_LOGIN_WINDOW_SECONDS": ("lab.login_window_seconds", "90", 90.0),
    # added after the grouping
    "HEMATOVISION_MAX_REQUEST_PIXELS": ("serving.max_request_pixels", "5000000", 5_000_000),
    "HEMATOVISION_SESSION_IDLE_MINUTES": ("lab.session_idle_minutes", "15", 15.0),
    "HEMATOVISION_TOKEN_DAYS": ("lab.token_days", "30", 30.0),
    "HEMATOVISION_MAX_FORM_BYTES": ("lab.max_form_bytes", "4096", 4096),
    "HEMATOVISION_TRUSTED_PROXIES": ("lab.trusted_proxies", '["10.0.0.1"]', ["10.0.0.1"]),
    "HEMATOVISION_CELL_TYPES": ("lab.cell_types", '["basophil", "band cell"]', ["basophil", "band cell"]),
    "HEMATOVISION_NEW_CLASS_MIN_CORRECTIONS": ("lab.new_class_min_corrections", "80", 80),
    "HEMATOVISION_EMBEDDING_CACHE_DAYS": ("paths.embedding_cache_days", "14", 14),
    "HEMATOVISION_EMBEDDING_DAYS": ("serving.embedding_days", "45", 45),
    "HEMATOVISION_IMAGES_BUDGET_MB": ("serving.images_budget_mb", "256", 256.0),
    "HEMATOVISION_PURGE_INTERVAL_MINUTES": ("serving.purge_interval_minutes", "15", 15.0),
    "HEMATOVISION_CORRECTION_IMAGE_DAYS": ("lab.correction_image_days", "365", 365),
    "HEMATOVISION_MONITOR_STATE_DB": ("monitoring.state_db", "/srv/monitor.sqlite", Path("/srv/monitor.sqlite")),
    "HEMATOVISION_MONITOR_WORKSPACE": ("monitoring.workspace", "/srv/workspace", Path("/srv/workspace")),
    "HEMATOVISION_MONITOR_WORKSPACE_URL": ("monitoring.workspace_url", "http://ops:8000", "http://ops:8000"),
    "HEMATOVISION_MONITOR_REPORTS_DIR": ("monitoring.reports_dir", "/srv/reports", Path("/srv/reports")),
    "HEMATOVISION_MONITOR_KEEP_REPORTS": ("monitoring.keep_reports", "77", 77),
    "HEMATOVISION_MONITOR_REFERENCES_DIR": ("monitoring.references_dir", "/srv/references", Path("/srv/references")),
    "HEMATOVISION_MONITOR_WINDOW": ("monitoring.window", "time", "time"),
    "HEMATOVISION_MONITOR_WINDOW_SIZE": ("monitoring.window_size", "40", 40),
    "HEMATOVISION_MONITOR_WINDOW_MINUTES": ("monitoring.window_minutes", "15", 15.0),
    "HEMATOVISION_MONITOR_MIN_WINDOW_SIZE": ("monitoring.min_window_size", "12", 12),
    "HEMATOVISION_MONITOR_MAX_WINDOWS_PER_RUN": ("monitoring.max_windows_per_run", "4", 4),
    "HEMATOVISION_REFERENCE_MAX_IMAGES": ("monitoring.reference_max_images", "123", 123),
    "HEMATOVISION_DRIFT_PERSISTENCE": ("drift.persistence", "5", 5),
    "HEMATOVISION_RETRAIN_MIN_CORRECTIONS": ("monitoring.retrain_min_corrections", "42", 42),
    "HEMATOVISION_RETRAIN_TRIGGER": ("monitoring.retrain_trigger", "auto", "auto"),
    "HEMATOVISION_ALERT_WEBHOOK_URL": (
        "monitoring.alert_webhook_url",
        "http://127.0.0.1:9/hook",
        "http://127.0.0.1:9/hook",
    ),
    "HEMATOVISION_DRIFT_STATS_THRESHOLD": ("drift.stats_threshold", "1.5", 1.5),
    "HEMATOVISION_DRIFT_STATS_SHARE": ("drift.stats_share", "0.25", 0.25),
    "HEMATOVISION_DRIFT_EMBEDDING_THRESHOLD": ("drift.embedding_threshold", "0.2", 0.2),
    "HEMATOVISION_DRIFT_EMBEDDING_COMPONENTS": ("drift.embedding_components", "8", 8),
    "HEMATOVISION_DRIFT_PREDICTION_THRESHOLD": ("drift.prediction_threshold", "0.6", 0.6),
    "HEMATOVISION_DRIFT_CONFIDENCE_THRESHOLD": ("drift.confidence_threshold", "0.75", 0.75),
    "HEMATOVISION_DRIFT_SIGNALS": ("drift.signals", '["prediction", "confidence"]', ["prediction", "confidence"]),
    # lab mode (issue 12)
    "HEMATOVISION_DVC_REMOTE": ("paths.dvc_remote", "s3://lab-bucket/dvc", "s3://lab-bucket/dvc"),
    "HEMATOVISION_SERVE_WORKERS": ("serving.workers", "4", 4),
    "HEMATOVISION_DEPLOY_WORK_POOL": ("deploy.work_pool", "cpu-pool", "cpu-pool"),
    "HEMATOVISION_DEPLOY_TRAINING_WORK_POOL": ("deploy.training_work_pool", "gpu-pool", "gpu-pool"),
    "HEMATOVISION_DEPLOY_SOURCE": ("deploy.source", "https://git.lab/hv.git", "https://git.lab/hv.git"),
    "HEMATOVISION_DEPLOY_MONITORING_CRON": ("deploy.monitoring_cron", "*/5 * * * *", "*/5 * * * *"),
    "HEMATOVISION_DEPLOY_PURGE_CRON": ("deploy.purge_cron", "30 2 * * *", "30 2 * * *"),
    "HEMATOVISION_DEPLOY_TIMEZONE": ("deploy.timezone", "Europe/Paris", "Europe/Paris"),
    "HEMATOVISION_DEPLOY_RETRAIN_ON_WORKER": ("deploy.retrain_on_worker", "true", True),
    "HEMATOVISION_DEPLOY_HEARTBEAT_SECONDS": ("deploy.heartbeat_seconds", "30", 30),
}


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    """No HematoVision variable set and no ``.env`` in the working directory; get_settings' cache
    is emptied after, so no other test sees settings made here."""
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX) or key.upper().removeprefix(ENV_PREFIX) in _bare_names():
            monkeypatch.delenv(key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def _bare_names() -> set[str]:
    return {name.removeprefix(ENV_PREFIX) for name in OLD_VARIABLES}


def value_of(settings: Settings, where: str):
    group, field = where.split(".")
    return getattr(getattr(settings, group), field)


def test_every_old_variable_is_still_a_setting():
    names = environment_names()
    assert {v: names.get(v) for v in OLD_VARIABLES} == {v: where for v, (where, _, _) in OLD_VARIABLES.items()}
    assert set(names) == set(OLD_VARIABLES), "a new setting: add its variable here, with a non-default value"


@pytest.mark.parametrize("variable", list(OLD_VARIABLES))
def test_an_old_variable_sets_the_same_value_in_its_group(clean_environment, variable):
    where, raw, expected = OLD_VARIABLES[variable]
    default = value_of(Settings(), where)
    assert default != expected, f"pick a value for {variable} that is not the default"
    clean_environment.setenv(variable, raw)
    check_environment()
    assert value_of(Settings(), where) == expected
    assert value_of(get_settings(), where) == expected


def test_all_old_variables_at_once(clean_environment):
    for variable, (_, raw, _) in OLD_VARIABLES.items():
        clean_environment.setenv(variable, raw)
    check_environment()
    settings = Settings()
    assert {v: value_of(settings, where) for v, (where, _, _) in OLD_VARIABLES.items()} == {
        v: expected for v, (_, _, expected) in OLD_VARIABLES.items()
    }


@pytest.mark.parametrize("variable", sorted(_bare_names()))
def test_a_variable_without_the_prefix_sets_nothing(clean_environment, variable):
    """As before the grouping, only ``HEMATOVISION_*`` variables are read: ``ALERT_WEBHOOK_URL`` or
    ``SERVE_THREADS`` left in a shell by another tool must not reach the platform."""
    where, raw, _ = OLD_VARIABLES[ENV_PREFIX + variable]
    default = value_of(Settings(), where)
    clean_environment.setenv(variable, raw)
    assert value_of(Settings(), where) == default, f"{variable} (no {ENV_PREFIX} prefix) changed {where}"


@pytest.mark.parametrize(
    "typo, meant",
    [
        ("HEMATOVISION_REVIEW_TRESHOLD", "HEMATOVISION_REVIEW_THRESHOLD"),
        ("HEMATOVISION_MONITOR_WINDOW_SIZ", "HEMATOVISION_MONITOR_WINDOW_SIZE"),
        ("HEMATOVISION_DRIFT_PERSISTANCE", "HEMATOVISION_DRIFT_PERSISTENCE"),
        ("HEMATOVISION_ALIAS", "HEMATOVISION_SERVE_ALIAS"),  # the field's new name is not a variable
    ],
)
def test_an_unknown_variable_is_an_error_naming_the_closest_setting(clean_environment, typo, meant):
    clean_environment.setenv(typo, "1")
    with pytest.raises(ValueError, match=rf"{typo}\b.*{meant}\b"):
        check_environment()
    with pytest.raises(ValueError, match=meant):
        get_settings()
    with pytest.raises(ValueError, match=meant):  # a mapping given explicitly is checked alike
        check_environment({typo: "1"})


def test_other_variables_are_not_checked(clean_environment):
    clean_environment.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    clean_environment.setenv("HOME_DIR_OF_SOMETHING_ELSE", "x")
    check_environment()  # raises on a HEMATOVISION_* name it does not know; these are not ours
    assert Settings().tracking_uri == "sqlite:///elsewhere.db"  # MLflow's own variable still wins


def test_a_dotenv_file_still_works_and_the_environment_wins(clean_environment, tmp_path):
    (tmp_path / ".env").write_text(
        "HEMATOVISION_REVIEW_THRESHOLD=0.33\n"
        "HEMATOVISION_SERVE_THREADS=5\n"  # a field renamed in its group (serving.threads)
        "HEMATOVISION_MONITOR_WINDOW_SIZE=20\n"  # a group with its own prefix
        "HEMATOVISION_RETRAIN_TRIGGER=off\n"  # a monitoring field that kept its old variable
        "HEMATOVISION_DRIFT_PERSISTENCE=4\n"
    )
    settings = Settings()
    assert (
        settings.serving.review_threshold,
        settings.serving.threads,
        settings.monitoring.window_size,
        settings.monitoring.retrain_trigger,
        settings.drift.persistence,
    ) == (0.33, 5, 20, "off", 4)
    clean_environment.setenv("HEMATOVISION_REVIEW_THRESHOLD", "0.5")
    assert Settings().serving.review_threshold == 0.5


def test_with_changes_is_a_copy_with_the_fields_changed(clean_environment):
    settings = Settings()
    changed = settings.with_changes(monitoring={"window_size": 20}, serving={"review_threshold": 0.9})
    assert (changed.monitoring.window_size, changed.serving.review_threshold) == (20, 0.9)
    assert (settings.monitoring.window_size, settings.serving.review_threshold) == (50, 0.7)  # untouched
    assert changed.monitoring.retrain_trigger == settings.monitoring.retrain_trigger  # the rest is kept
    assert changed.paths == settings.paths and changed.drift == settings.drift
    with pytest.raises(ValueError, match="no settings group 'monitor'"):
        settings.with_changes(monitor={"window_size": 20})
