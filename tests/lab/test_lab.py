"""People on the real service: accounts and roles, sign-in with CSRF and a rate limit, the review
queue, corrections that are never lost (even when the server is killed mid-stream), what the lab
learns, and the corrections exported as a DVC-pinned dataset."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, datetime

import pytest
import requests
import yaml
from typer.testing import CliRunner

from hematovision import CLASSES, stores
from hematovision.cli import app
from hematovision.lab.corrections import Corrections
from hematovision.registry.registry import CHAMPION
from hematovision.settings import get_settings

from conftest import BLOOD_CELLS, add_user, service_env, start_service, stop_service

PASSWORD = "correct horse battery"
IMAGES = [p for c in CLASSES for p in sorted((BLOOD_CELLS / "TEST" / c.upper()).glob("*.jpeg"))[3:6]]


@pytest.fixture(scope="module")
def people(project):
    add_user("paula", "pathologist", password=PASSWORD)
    add_user("peter", "pathologist", password=PASSWORD)
    add_user("erin", "engineer", password=PASSWORD)
    add_user("otto", "ops", password=PASSWORD)
    add_user("olga", "ops", password=PASSWORD)  # locked out by the sign-in limit test
    token = CliRunner().invoke(app, ["users", "token", "erin", "--name", "ci"])
    assert token.exit_code == 0
    return {"erin_token": token.output.strip().splitlines()[-1]}


def sign_in(url: str, name: str) -> requests.Session:
    session = requests.Session()
    response = session.post(f"{url}/login", data={"username": name, "password": PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    session.headers["X-CSRF-Token"] = response.json()["csrf_token"]
    return session


def predict_some(url: str) -> list[dict]:
    out = []
    for path in IMAGES:
        response = requests.post(f"{url}/predict", files={"image": (path.name, path.read_bytes())}, timeout=60)
        assert response.status_code == 200
        out.append(response.json())
    return out


def test_users_command_lists_and_refuses_bad_accounts(people):
    listing = CliRunner().invoke(app, ["users", "list"])
    assert "paula" in listing.output and "pathologist" in listing.output
    weak = CliRunner().invoke(
        app, ["users", "add", "weak", "--role", "pathologist", "--password-stdin"], input="short\n"
    )
    assert weak.exit_code == 1 and "at least" in weak.output
    bad_role = CliRunner().invoke(
        app, ["users", "add", "x1", "--role", "wizard", "--password-stdin"], input=PASSWORD + "\n"
    )
    assert bad_role.exit_code == 1


@pytest.mark.e2e
def test_roles_csrf_and_sign_in_limits(service_url, people):
    anonymous = requests.post(
        f"{service_url}/feedback",
        files={"image": ("c.jpeg", IMAGES[0].read_bytes())},
        data={"true_class": "eosinophil"},
        timeout=30,
    )
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"

    paula = sign_in(service_url, "paula")
    assert paula.get(f"{service_url}/me", timeout=10).json()["roles"] == ["pathologist"]
    no_csrf = requests.post(
        f"{service_url}/feedback",
        cookies=paula.cookies,
        timeout=30,
        files={"image": ("c.jpeg", IMAGES[0].read_bytes())},
        data={"true_class": "eosinophil"},
    )
    assert no_csrf.status_code == 403 and no_csrf.json()["error"] == "csrf"
    champion = str(stores.registry().version_by_alias(CHAMPION).version)
    assert paula.post(f"{service_url}/models/{champion}/promote", timeout=30).status_code == 403  # not an engineer
    assert paula.get(f"{service_url}/audit", timeout=10).status_code == 403

    erin = {"Authorization": f"Bearer {people['erin_token']}"}
    promoted = requests.post(f"{service_url}/models/{champion}/promote", headers=erin, timeout=60)
    assert promoted.status_code == 202, promoted.text  # a job: the gate runs in a worker thread
    deadline = time.monotonic() + 120
    while (job := requests.get(f"{service_url}{promoted.json()['url']}", headers=erin, timeout=30).json())[
        "status"
    ] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job["status"] == "done" and job["result"]["passed"], job  # already the champion: nothing moves
    assert (
        requests.post(
            f"{service_url}/models/{champion}/promote", headers={"Authorization": "Bearer hv_forged"}, timeout=30
        ).status_code
        == 401
    )

    for _ in range(get_settings().lab.login_attempts):
        assert (
            requests.post(
                f"{service_url}/login", data={"username": "olga", "password": "wrong password!"}, timeout=30
            ).status_code
            == 401
        )
    limited = requests.post(f"{service_url}/login", data={"username": "olga", "password": PASSWORD}, timeout=30)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert (
        requests.post(f"{service_url}/login", data={"username": "paula", "password": PASSWORD}, timeout=30).status_code
        == 200
    )  # another account is not locked out


@pytest.mark.e2e
def test_review_queue_corrections_and_what_the_lab_learns(project, service_url, people):
    # The queue from this test's own predictions on: other tests fill the shared service's queue too
    # (a load test can flag hundreds), and the queue answers at most 500.
    since = datetime.now(UTC).isoformat(timespec="milliseconds")
    predicted = predict_some(service_url)
    paula, peter = sign_in(service_url, "paula"), sign_in(service_url, "peter")
    queue = paula.get(f"{service_url}/review/queue", params={"limit": 500, "since": since}, timeout=30).json()["items"]
    ours = [item for item in queue if item["id"] in {p["prediction_id"] for p in predicted}]
    assert len(ours) == sum(p["needs_review"] for p in predicted) > 3
    # Cells of a type the model does not know first, then the least certain.
    order = [(item["label"] != "unknown", item["confidence"]) for item in queue]
    assert order == sorted(order)
    ours.sort(key=lambda item: item["label"] == "unknown")  # one of the classes first: it can be confirmed
    sent = {p["prediction_id"]: path for p, path in zip(predicted, IMAGES)}
    assert paula.get(f"{service_url}{ours[0]['image_url']}", timeout=30).content == sent[ours[0]["id"]].read_bytes()
    assert requests.get(f"{service_url}{ours[0]['image_url']}", timeout=30).status_code == 401
    label = ours[0]["label"]
    filtered = paula.get(
        f"{service_url}/review/queue", params={"label": label, "limit": 500, "since": since}, timeout=30
    ).json()["items"]
    assert filtered and all(item["label"] == label for item in filtered)

    # Paula confirms one and corrects two; Peter disagrees with her on the first.
    assert ours[0]["label"] != "unknown"
    answers = [
        (ours[0], ours[0]["label"]),
        (ours[1], next(c for c in CLASSES if c != ours[1]["label"])),
        (ours[2], next(c for c in CLASSES if c != ours[2]["label"])),
    ]
    for item, true_class in answers:
        response = paula.post(
            f"{service_url}/feedback",
            data={"prediction_id": item["id"], "true_class": true_class, "comment": "checked at 100x"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        assert response.json()["reviewer"] == "paula" and response.json()["model_version"] == item["model_version"]
    other = next(c for c in CLASSES if c != ours[0]["label"])
    assert (
        peter.post(
            f"{service_url}/feedback", data={"prediction_id": ours[0]["id"], "true_class": other}, timeout=30
        ).status_code
        == 201
    )
    bad = paula.post(
        f"{service_url}/feedback", data={"prediction_id": ours[3]["id"], "true_class": "dragon"}, timeout=30
    )
    assert bad.status_code == 422  # not a class, not in the laboratory's vocabulary

    remaining = {
        item["id"]
        for item in paula.get(f"{service_url}/review/queue", params={"limit": 500, "since": since}, timeout=30).json()[
            "items"
        ]
    }
    assert not remaining & {item["id"] for item, _ in answers}

    otto = sign_in(service_url, "otto")
    stats = otto.get(f"{service_url}/feedback/stats", timeout=30).json()
    assert stats["overall"]["reviewed"] >= 4 and stats["overall"]["confirmed"] >= 1
    assert sum(map(sum, stats["confusion"]["matrix"])) == stats["overall"]["reviewed"]
    assert any(set(labels) == {"paula", "peter"} for labels in stats["disputed_images"].values())
    csv_text = otto.get(f"{service_url}/feedback/export.csv", timeout=30).text
    assert csv_text.splitlines()[0].startswith("created_at,reviewer") and "checked at 100x" in csv_text
    pdf = otto.get(f"{service_url}/feedback/report.pdf", timeout=30)
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF") and len(pdf.content) > 1000

    erin = {"Authorization": f"Bearer {people['erin_token']}"}
    actions = [e["action"] for e in requests.get(f"{service_url}/audit", headers=erin, timeout=30).json()["entries"]]
    assert {"login", "confirm", "correct", "promote"} <= set(actions)


@pytest.mark.e2e
def test_feedback_export_is_a_dvc_version_and_idempotent(project, service_url, people):
    # Images no other test reviews, so what is agreed and what is disputed is this test's own doing.
    agreed = {c: sorted((BLOOD_CELLS / "TEST" / c.upper()).glob("*.jpeg"))[9] for c in ("eosinophil", "lymphocyte")}
    contested = sorted((BLOOD_CELLS / "TEST" / "MONOCYTE").glob("*.jpeg"))[9]
    paula, peter = sign_in(service_url, "paula"), sign_in(service_url, "peter")
    for reviewer, path, true_class in [
        (paula, agreed["eosinophil"], "eosinophil"),
        (paula, agreed["lymphocyte"], "lymphocyte"),
        (paula, contested, "monocyte"),
        (peter, contested, "neutrophil"),
    ]:
        assert (
            reviewer.post(
                f"{service_url}/feedback",
                files={"image": (path.name, path.read_bytes())},
                data={"true_class": true_class},
                timeout=30,
            ).status_code
            == 201
        )
    first = CliRunner().invoke(app, ["feedback", "export"])
    assert first.exit_code == 0, first.output
    dvc_file = project / "corrections.dvc"
    pinned = yaml.safe_load(dvc_file.read_text())["outs"][0]
    assert pinned["path"] == "corrections" and pinned["nfiles"] >= 2
    exported = {p.stem: p.parent.name for p in (project / "corrections").rglob("*.*")}
    for true_class, path in agreed.items():
        assert exported[hashlib.sha256(path.read_bytes()).hexdigest()] == true_class
    assert hashlib.sha256(contested.read_bytes()).hexdigest() not in exported  # left out until they agree
    assert "disputed left out" in first.output

    before = dvc_file.read_text()
    second = CliRunner().invoke(app, ["feedback", "export"])
    assert second.exit_code == 0 and "0 new, 0 removed" in second.output
    assert dvc_file.read_text() == before


@pytest.mark.e2e
def test_no_acknowledged_correction_is_lost_when_the_server_is_killed(project, trained, people, tmp_path_factory):
    server, url = start_service(
        project, tmp_path_factory.mktemp("killed") / "service.log", service_env(tmp_path_factory)
    )
    acknowledged: list[str] = []
    stop = threading.Event()
    data = IMAGES[-1].read_bytes()

    def reviewer(name: str) -> None:
        session = sign_in(url, name)
        while not stop.is_set():
            try:
                response = session.post(
                    f"{url}/feedback",
                    files={"image": ("c.jpeg", data)},
                    data={"true_class": "neutrophil", "comment": "stream"},
                    timeout=10,
                )
            except requests.RequestException:
                return  # the server is gone
            if response.status_code == 201:
                acknowledged.append(response.json()["id"])

    threads = [threading.Thread(target=reviewer, args=(n,)) for n in ("paula", "peter", "paula", "peter")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_service(server, kill=True)  # SIGKILL in mid-stream: no chance to flush anything
    stop.set()
    for t in threads:
        t.join()
    assert len(acknowledged) >= 20

    server, url = start_service(
        project, tmp_path_factory.mktemp("restarted") / "service.log", service_env(tmp_path_factory)
    )
    try:
        stored = {
            row["id"]
            for row in Corrections(project / "monitoring" / "lab.sqlite", project / "monitoring" / "corrections").all()
            if row["comment"] == "stream"
        }
        assert set(acknowledged) <= stored
        otto = sign_in(url, "otto")
        assert otto.get(f"{url}/feedback/stats", timeout=30).json()["corrections"] >= len(stored)
    finally:
        stop_service(server)


def test_predicting_needs_a_sign_in_or_a_token_unless_opened(project, people, monkeypatch):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from hematovision.api.auth import may_predict
    from hematovision.api.guard import RequestGuard, Upload

    async def answered(_request):
        return PlainTextResponse("predicted")

    guarded = RequestGuard(
        Starlette(routes=[Route("/predict", answered, methods=["POST"])]),
        routes={"/predict": Upload("image")},
        max_bytes=1 << 20,
        authorize=may_predict,
    )
    client = TestClient(guarded)
    files = {"image": ("c.jpeg", IMAGES[0].read_bytes())}
    refused = client.post("/predict", files=files)  # signed-in users and tokens only, by default
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    token = CliRunner().invoke(app, ["users", "token", "otto", "--name", "lis"]).output.strip().splitlines()[-1]
    assert client.post("/predict", files=files, headers={"Authorization": f"Bearer {token}"}).status_code == 200

    monkeypatch.setenv("HEMATOVISION_PREDICT_REQUIRES_TOKEN", "false")  # opened, e.g. for a public demo
    get_settings.cache_clear()
    try:
        assert client.post("/predict", files=files).status_code == 200
    finally:
        monkeypatch.delenv("HEMATOVISION_PREDICT_REQUIRES_TOKEN")
        get_settings.cache_clear()
