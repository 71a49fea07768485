"""Predicting needs a signed-in user or an API token, by default; only a setting opens it to anyone.

The request guard (``api/guard.py``) with ``may_predict`` decides before BentoML reads anything, so
it is driven here as a plain ASGI app in front of a stand-in for the service, no model or BentoML
needed. The session's shared service runs explicitly opened (``service_env`` in conftest); the
predict page's answer to a refusal is checked on a service with the default in tests/web."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from hematovision import stores
from hematovision.api.auth import COOKIE, may_predict
from hematovision.api.guard import RequestGuard, Upload
from hematovision.lab.accounts import ROLES
from hematovision.settings import Settings, get_settings

VARIABLE = "HEMATOVISION_PREDICT_REQUIRES_TOKEN"
PASSWORD = "predicting needs a sign-in"
IMAGE = ("c.jpeg", b"\xff\xd8\xff\xe0 stands in for an image: the guard reads no pixels")
# One anonymous upload to each prediction route, as the predict page and API clients send them.
UPLOADS = {
    "/predict": {"files": {"image": IMAGE}},
    "/predict_batch": {"files": [("images", IMAGE), ("images", IMAGE)]},
    "/explain": {"files": {"image": IMAGE}, "data": {"class_name": "monocyte"}},
}


@pytest.fixture
def default_settings(monkeypatch):
    """The settings as shipped for this one setting (whatever the shell or a test set before)."""
    monkeypatch.delenv(VARIABLE, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


@pytest.fixture
def guarded() -> tuple[TestClient, list[str]]:
    """The guard as service.py sets it up, in front of a stand-in that records what reached it."""
    answered: list[str] = []

    async def service(request):
        answered.append(request.url.path)
        return PlainTextResponse("predicted")

    app = RequestGuard(
        Starlette(routes=[Route(path, service, methods=["POST"]) for path in UPLOADS]),
        routes={
            "/predict": Upload("image"),
            "/predict_batch": Upload("images", 64),
            "/explain": Upload("image", required=False),
        },
        max_bytes=1 << 20,
        authorize=may_predict,
    )
    return TestClient(app), answered


@pytest.fixture(scope="module")
def callers(project) -> dict[str, str]:
    """An API token for an account of every role, made through the lab's accounts store."""
    accounts = stores.accounts()
    tokens = {}
    for role in ROLES:
        accounts.add_user(f"predicts-{role}", PASSWORD, [role])
        tokens[role] = accounts.create_token(f"predicts-{role}", "predict sign-in test")
    return tokens


def test_predicting_requires_a_sign_in_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv(VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    assert Settings().lab.predict_requires_token is True
    monkeypatch.setenv(VARIABLE, "false")
    assert Settings().lab.predict_requires_token is False


@pytest.mark.parametrize("route", list(UPLOADS))
def test_an_anonymous_upload_is_refused_before_the_service_sees_it(default_settings, guarded, callers, route):
    client, answered = guarded
    refused = client.post(route, **UPLOADS[route])
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"] == "unauthorized" and "sign" in refused.json()["detail"]
    made_up = client.post(route, **UPLOADS[route], headers={"Authorization": "Bearer not-a-token"})
    assert made_up.status_code == 401
    # A retained image's explanation (by prediction id) is refused to nobody less.
    if route == "/explain":
        assert client.post(route, data={"prediction_id": "feedc0de" * 4}).status_code == 401
    assert answered == []


@pytest.mark.parametrize("route", list(UPLOADS))
def test_a_token_of_any_role_predicts(default_settings, guarded, callers, route):
    client, answered = guarded
    for role, token in callers.items():
        response = client.post(route, **UPLOADS[route], headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, f"{role}: {response.text}"
    assert answered == [route] * len(ROLES)


def test_a_signed_in_browser_predicts_with_its_session_cookie_alone(default_settings, guarded, callers):
    """The predict page sends the session cookie (same origin); a prediction changes nothing of
    the lab's, so no CSRF token is asked for."""
    client, answered = guarded
    accounts = stores.accounts()
    secret, _ = accounts.start_session(accounts.authenticate("predicts-ops", PASSWORD))
    client.cookies.set(COOKIE, secret)
    assert client.post("/predict", **UPLOADS["/predict"]).status_code == 200
    assert client.post("/predict_batch", **UPLOADS["/predict_batch"]).status_code == 200
    accounts.end_session(secret)  # signed out: refused again
    assert client.post("/predict", **UPLOADS["/predict"]).status_code == 401
    assert answered == ["/predict", "/predict_batch"]


def test_a_disabled_account_no_longer_predicts(default_settings, guarded, project):
    client, _ = guarded
    accounts = stores.accounts()
    accounts.add_user("predicts-leaver", PASSWORD, ["pathologist"])
    token = accounts.create_token("predicts-leaver", "predict sign-in test")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/predict", **UPLOADS["/predict"], headers=headers).status_code == 200
    accounts.disable_user("predicts-leaver")
    assert client.post("/predict", **UPLOADS["/predict"], headers=headers).status_code == 401


def test_the_setting_opens_predicting_to_anyone_for_a_public_demo(default_settings, guarded, project):
    client, answered = guarded
    default_settings.setenv(VARIABLE, "false")
    get_settings.cache_clear()
    for route, upload in UPLOADS.items():
        assert client.post(route, **upload).status_code == 200, route
    assert answered == list(UPLOADS)
