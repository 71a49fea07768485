"""The platform's stores, each opened in one place from the settings.

Every part of the lifecycle that needs a store asks for it here, so moving a store (sqlite to a
database server, a local MLflow store to a tracking server, a local Evidently workspace to a remote
one) is a change in one function. ``tests/test_layout.py`` checks that nothing else in ``src/`` or
``flows/`` constructs them.

=====================  ===============================================  ==============================
store                  what lives there                                 setting
=====================  ===============================================  ==============================
registry               model versions, aliases, runs and artifacts       ``registry.*``, MLFLOW_TRACKING_URI
embedding cache        backbone embeddings by image content              ``paths.cache_dir``
prediction log         every served prediction, retained images          ``serving.predictions_db`` [1]_
lab database           accounts, sessions, corrections, audit            ``lab.lab_db`` [1]_
monitor state          drift windows, alerts, checkpoints                ``monitoring.state_db`` [1]_
drift workspace        Evidently snapshots and dashboards                ``monitoring.workspace``
ops' drift workspace   a copy of them on an Evidently UI service         ``monitoring.workspace_url``
=====================  ===============================================  ==============================

.. [1] or, when ``lab.database_url`` is set (lab mode), all three in that PostgreSQL database
   (``database.py``, ``docs/database.md``), the retained and corrected images included
   (``image_store.py``): a host keeps nothing of its own but the embedding cache.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from hematovision import CLASSES
from hematovision.lab.accounts import Accounts
from hematovision.lab.corrections import Corrections
from hematovision.model.embeddings import EmbeddingCache
from hematovision.model.open_set import UNKNOWN
from hematovision.monitoring.state import MonitorState
from hematovision.registry.registry import Registry
from hematovision.registry.tracking import point_mlflow
from hematovision.serving.prediction_log import PredictionStore
from hematovision.settings import Settings, get_settings

EMBEDDINGS_FILE = "embeddings.sqlite"

# One prediction log per process and database: every request thread of a serving worker shares its
# connection pool.
_prediction_logs: dict[tuple, PredictionStore] = {}
_prediction_logs_lock = threading.Lock()


def database(settings: Settings, sqlite_file: Path) -> str | Path:
    """Where a store's tables live: lab mode's PostgreSQL (``lab.database_url``) when set, shared by
    every store and host; otherwise the store's own sqlite file."""
    return settings.lab.database_url or settings.path(sqlite_file)


def registry(settings: Settings | None = None) -> Registry:
    """The MLflow registry of the served model (MLflow's process-wide URI is pointed at it too, for
    the calls that read it: logging runs, downloading artifacts)."""
    settings = settings or get_settings()
    return Registry(settings.registry.registered_model, point_mlflow(settings))


def embedding_cache(settings: Settings | None = None) -> EmbeddingCache:
    """The backbone embedding cache; close it when done (``with stores.embedding_cache() as cache:``)."""
    settings = settings or get_settings()
    return EmbeddingCache(settings.path(settings.paths.cache_dir) / EMBEDDINGS_FILE)


def prediction_log(settings: Settings | None = None) -> PredictionStore:
    """The prediction log, with the retention the settings ask for; shared within the process."""
    settings = settings or get_settings()
    serving = settings.serving
    key = (
        database(settings, serving.predictions_db),
        settings.path(serving.images_dir),
        serving.retain_images_days > 0,
        serving.review_image_days > 0,
    )
    with _prediction_logs_lock:
        if key not in _prediction_logs:
            _prediction_logs[key] = PredictionStore(*key[:2], retain_images=key[2], retain_review_images=key[3])
        return _prediction_logs[key]


def accounts(settings: Settings | None = None) -> Accounts:
    """Accounts, roles, sessions and API tokens (the lab database)."""
    settings = settings or get_settings()
    return Accounts(database(settings, settings.lab.lab_db), settings.lab.session_hours)


def answerable_types(settings: Settings | None = None) -> tuple[str, ...]:
    """What a pathologist may say a cell is: the four classes and the laboratory's vocabulary."""
    settings = settings or get_settings()
    # "unknown" is the model's answer, never a pathologist's: they say what the cell is ("other" at worst)
    vocabulary = [t.strip().lower() for t in settings.lab.cell_types if t.strip() and t.strip().lower() != UNKNOWN]
    return tuple(dict.fromkeys([*CLASSES, *vocabulary]))


def corrections(settings: Settings | None = None) -> Corrections:
    """Pathologists' corrections and the audit log (the lab database), with the corrected images."""
    settings = settings or get_settings()
    return Corrections(
        database(settings, settings.lab.lab_db),
        settings.path(settings.lab.corrections_images_dir),
        answerable_types(settings),
    )


def monitor_state(settings: Settings | None = None) -> MonitorState:
    """The drift monitor's windows, alerts and checkpoints."""
    settings = settings or get_settings()
    return MonitorState(database(settings, settings.monitoring.state_db))


def drift_workspace(settings: Settings | None = None):
    """The Evidently workspace that keeps every window's snapshot (``hematovision monitor ui``)."""
    from evidently.ui.workspace import Workspace  # heavy: loaded only by the monitor

    settings = settings or get_settings()
    path = settings.path(settings.monitoring.workspace)
    path.mkdir(parents=True, exist_ok=True)
    return Workspace(str(path))


# evidently's RemoteWorkspace sends with no timeout: a host that never answers would hang the
# monitoring run, so the service is asked for its version with one before anything is sent.
EVIDENTLY_REACH_TIMEOUT_SECONDS = 10.0
EVIDENTLY_APPLICATION = "Evidently UI"  # what `GET /api/version` of `evidently ui` answers as "application"


def check_evidently_service(url: str, timeout: float = EVIDENTLY_REACH_TIMEOUT_SECONDS) -> None:
    """Raise unless ``url`` is an http(s) address where an Evidently UI service answers in time."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"monitoring.workspace_url {url!r} is not an http(s) URL of an Evidently UI service")
    with urllib.request.urlopen(urllib.parse.urljoin(url, "/api/version"), timeout=timeout) as response:
        application = json.loads(response.read()).get("application")
    if application != EVIDENTLY_APPLICATION:
        raise ValueError(f"{url} answers, but not as an Evidently UI service (application: {application!r})")


def remote_drift_workspace(settings: Settings | None = None):
    """Lab mode: a client of the Evidently UI service at ``monitoring.workspace_url``, checked to
    answer first."""
    from evidently.ui.workspace import RemoteWorkspace  # heavy: loaded only by the monitor

    settings = settings or get_settings()
    url = settings.monitoring.workspace_url.strip()
    check_evidently_service(url)
    return RemoteWorkspace(url, verify=False)  # verified above, with a timeout
