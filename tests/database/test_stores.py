"""Every store, round trip, on both backends: sqlite files (the embedded default) and a real
PostgreSQL (lab mode). The same calls, the same answers."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from hematovision.lab.accounts import AccountError, Accounts, User
from hematovision.lab.corrections import Corrections
from hematovision.monitoring.state import MonitorState
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore

PASSWORD = "a long enough password"


def picture(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def record(version: str = "3", label: str = "monocyte", confidence: float = 0.9, review: bool = False, seed: int = 0):
    return PredictionRecord(
        version,
        label,
        confidence,
        {label: confidence, "other": 1 - confidence},
        review,
        f"{seed:064x}",
        12.5,
        {"brightness": 0.5},
        np.linspace(-1, 1, 16),
        open_set_score=0.25,
    )


def test_accounts_sessions_tokens_and_the_sign_in_limit(backend):
    accounts = Accounts(backend["lab"], session_hours=1)
    accounts.add_user("ann", PASSWORD, ["pathologist", "ops"])
    with pytest.raises(AccountError, match="already exists"):
        accounts.add_user("ann", PASSWORD, ["ops"])
    assert accounts.list_users()[0] | {"created_at": None} == {
        "username": "ann",
        "roles": ["ops", "pathologist"],
        "disabled": False,
        "created_at": None,
    }
    user = accounts.authenticate("ann", PASSWORD)
    assert user == User("ann", frozenset({"pathologist", "ops"}))
    assert accounts.authenticate("ann", "wrong password!") is None

    secret, session = accounts.start_session(user)
    assert accounts.session(secret) == session
    accounts.end_session(secret)
    assert accounts.session(secret) is None

    token = accounts.create_token("ann", "scanner")
    assert accounts.token_user(token) == user
    (listed,) = accounts.list_tokens("ann")
    assert listed["name"] == "scanner" and not listed["expired"]
    assert accounts.revoke_token("ann", listed["id"]) == {"id": listed["id"], "name": "scanner"}
    assert accounts.token_user(token) is None

    now = time.time()
    for offset in (3, 2, 1):
        accounts.sign_in_failed("ann", "10.0.0.1", window=60, now=now - offset)
    assert accounts.sign_in_retry_after("ann", "10.0.0.1", attempts=3, window=60, now=now) == pytest.approx(57)
    assert accounts.sign_in_retry_after("ann", "10.0.0.2", attempts=3, window=60, now=now) == 0
    accounts.sign_in_succeeded("ann", "10.0.0.1")
    assert accounts.sign_in_failures() == 0

    secret, _ = accounts.start_session(user)
    accounts.disable_user("ann")
    assert accounts.session(secret) is None and accounts.authenticate("ann", PASSWORD) is None


def test_corrections_and_the_audit_log(backend, tmp_path):
    corrections = Corrections(backend["lab"], tmp_path / "images")
    first = corrections.submit("ann", "Monocyte", picture(1), {"label": "monocyte", "model_version": "3", "id": "p1"})
    second = corrections.submit(
        "bob", "lymphocyte", picture(1), {"label": "monocyte", "model_version": "3", "id": "p1"}
    )
    corrections.audit("ann", "export", "corrections", {"images": 1})
    assert [row["id"] for row in corrections.all()] == [first["id"], second["id"]]
    assert corrections.all()[0] == first
    assert corrections.count() == 2 and corrections.count_since(first["created_at"]) <= 1
    assert corrections.reviewed_prediction_ids() == {"p1"}
    assert [(e["actor"], e["action"]) for e in corrections.audit_log()] == [
        ("ann", "export"),
        ("bob", "correct"),
        ("ann", "confirm"),
    ]
    assert corrections.audit_log()[0]["detail"] == {"images": 1}
    stats = corrections.stats()
    assert stats["overall"] == {"reviewed": 2, "confirmed": 1, "agreement": 0.5}
    assert list(stats["disputed_images"]) == [first["image_sha256"]]
    assert corrections.purge_images(older_than_days=1) == {"images": 0, "exported": 0}  # corrected just now
    assert corrections.purge_images(older_than_days=0) == {"images": 1, "exported": 0}
    assert corrections.image(first["image_sha256"]) is None and corrections.count() == 2


def test_the_prediction_log(backend, tmp_path):
    log = PredictionStore(backend["predictions"], tmp_path / "kept", retain_review_images=True)
    calm = record(seed=1)
    doubtful = record(label="unknown", confidence=0.4, review=True, seed=2)
    other_version = record(version="4", seed=3)
    ids = log.log_many([calm, doubtful, other_version], [b"calm", b"doubt", b"other"])
    assert ids == [calm.id, doubtful.id, other_version.id] and log.count() == 3

    stored = log.get(doubtful.id)
    assert stored["probabilities"] == {"unknown": 0.4, "other": pytest.approx(0.6)}
    assert stored["needs_review"] is True and stored["open_set_score"] == 0.25
    np.testing.assert_allclose(stored["embedding"], np.linspace(-1, 1, 16), atol=1e-3)  # float16 on disk
    assert stored["image_kept"] is True and log.image(doubtful.image_sha256) == b"doubt"
    assert log.get(calm.id)["image_kept"] is False and log.image(calm.image_sha256) is None
    assert log.get("nope") is None

    window = log.logged_after("3", 0)
    assert [r["label"] for r in window] == ["monocyte", "unknown"]
    assert log.logged_after("3", window[0]["rowid"])[0]["label"] == "unknown"  # the checkpoint counts
    assert [r["id"] for r in log.review_queue(exclude=set())] == [doubtful.id]
    assert log.review_queue(exclude={doubtful.id}) == []
    assert log.review_queue(exclude=set(), model_version="4") == []
    assert log.review_image_hashes() == {doubtful.image_sha256}

    assert log.drop_embeddings(older_than_days=0) == 3
    assert log.get(calm.id)["embedding"] is None and log.logged_after("3", 0) == []


def test_the_monitoring_state(backend):
    state = MonitorState(backend["monitoring"])
    assert state.get("checkpoint:3", 0) == 0
    state.put("checkpoint:3", 41)
    state.put("checkpoint:3", 42)
    assert state.get("checkpoint:3") == 42

    window = {
        "checked_at": "2026-11-29T10:00:00.000+00:00",
        "model_version": "3",
        "mode": "count",
        "first_rowid": 1,
        "last_rowid": 42,
        "start_at": "2026-11-29T09:00:00.000+00:00",
        "end_at": "2026-11-29T09:59:00.000+00:00",
        "n": 42,
        "drifting": True,
        "signals": {"embedding": 0.3},
        "report": None,
    }
    first = state.add_window(window)
    second = state.add_window(window)
    state.set_report(first, "old.html")
    state.set_report(second, "new.html")
    assert state.drift_streak("3") == (2, window["start_at"])
    assert state.windows(model_version="3")[0]["signals"] == {"embedding": 0.3}
    assert state.reports_beyond(1) == [(first, "old.html")]
    state.clear_report(first)
    assert state.reports_beyond(0) == [(second, "new.html")]

    alert = state.add_alert("drift", "3", "drifting", {"since": "then"}, "awaiting_approval")
    assert state.alerts(status=["awaiting_approval"]) == [alert]
    approved = state.approve(alert["id"], "eve")
    assert approved["status"] == "approved" and approved["decided_by"] == "eve"
    with pytest.raises(ValueError, match="not awaiting approval"):
        state.approve(alert["id"], "eve")
    with pytest.raises(KeyError):
        state.approve(alert["id"] + 1, "eve")
    state.update_alert(alert["id"], status="retraining", detail={"run": 1})
    assert state.alert(alert["id"])["detail"] == {"run": 1}
    assert state.alerts(status=["awaiting_approval"]) == []
