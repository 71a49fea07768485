"""Review-page benchmark: the time a pathologist waits from a key press on the review page to the
next item's image on screen, and how many items a minute the page sustains.

    uv run --frozen python benchmarks/review_page.py [--items 100] [--think-ms 0]

Starts ``bentoml serve`` of the registry's champion (as `hematovision serve` does) with a
throwaway lab database, corrections folder, prediction log and images folder, ``review_threshold``
1.0 (every answer needs review) and the review images kept (``review_image_days`` 30). Fills the
queue by POSTing real TEST images (classes interleaved) to /predict until ``--queue`` are flagged
(a confidence that rounds to 1.0 is not below 1.0: those few are not), creates a
pathologist account, signs in through the login page in a headless Chromium (Debian's chromium
and chromedriver, as tests/test_web.py drives them) and reviews ``--items`` items by pressing a
class key each (1-4 and e/l/m/n in turn), waiting ``--think-ms`` after each image appears.

Timing is taken in the page, not in Python: a capture-phase keydown listener notes
``performance.now()`` at the press, and a MutationObserver on the image slot notes when the next
item's ``<img>`` (already loaded) is put in; the time counted is the animation frame after
``img.decode()`` resolves, i.e. the frame that shows the decoded image. review.js is unchanged.
The page shows an item once both its image and its Grad-CAM have arrived (it prefetches the next
two), so the measure includes /feedback, and /explain when the prefetch has not finished.
Afterwards the corrections in the store must number ``--items`` and be exactly the items answered.

Appends a dated section to benchmarks/RESULTS.md (``--no-record`` to only print).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests
from serving import BIN, ROOT, SERVICE, Server, free_port, percentile, read_images
from training import machine, record

from hematovision import stores
from hematovision.settings import TELEMETRY_OFF, get_settings

os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager is never run (paths given)

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
USER, PASSWORD = "bench-pathologist", "benchmark password 123"
KEYS = ("1", "2", "3", "4", "e", "l", "m", "n")  # every class key of the page, in turn
MAIN_REGISTRY = Path("/work/main/mlruns")  # read-only fallback when this checkout has no registry

# Installed in the page after sign-in. Records, in performance.now() ms:
#   keys:  {t, id}  each keydown (capture phase, before review.js sees it), id = item on screen
#   shown: {id, inserted, painted, gradcam}  each time a loaded image is put into #image-slot
HOOK = """
const b = window.__reviewBench = {keys: [], shown: []};
const item = document.getElementById("item"), slot = document.getElementById("image-slot");
window.addEventListener("keydown", () => b.keys.push({t: performance.now(), id: item.dataset.predictionId}), true);
let last = null;
const seen = () => {
  const img = slot.querySelector("img.image");
  if (!img || img === last || !img.complete || !img.naturalWidth) return;
  last = img;
  const cam = document.querySelector("#gradcam-slot img.gradcam");
  const rec = {id: item.dataset.predictionId, inserted: performance.now(), painted: null, gradcam: !!(cam && cam.naturalWidth)};
  b.shown.push(rec);
  img.decode().catch(() => null).then(() => requestAnimationFrame(() => { rec.painted = performance.now(); }));
};
new MutationObserver(seen).observe(slot, {childList: true});
seen();
"""

# Resolves with the id of the item shown once the n-th image (counted from 1) is painted.
WAIT_SHOWN = """
const n = arguments[0], done = arguments[arguments.length - 1];
const check = () => {
  const s = window.__reviewBench.shown;
  if (s.length >= n && s[n - 1].painted !== null) done(s[n - 1].id); else setTimeout(check, 2);
};
check();
"""


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1366,900",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def wait(driver, condition, message: str, timeout: float = 120):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100, help="items reviewed, one key press each (default 100)")
    parser.add_argument(
        "--queue", type=int, default=None, help="TEST images predicted into the queue (default items + 10)"
    )
    parser.add_argument(
        "--think-ms", type=float, default=0, help="pause after each image appears before the key (default 0)"
    )
    parser.add_argument("--no-record", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()
    queue_size = args.queue or args.items + 10
    if queue_size <= args.items:
        parser.error("--queue must exceed --items (the last press needs a next item to show)")

    workdir = Path(tempfile.mkdtemp(prefix="hematovision-review-bench-"))
    lab_db, corrections_dir = workdir / "lab.sqlite", workdir / "corrections"
    # The throwaway lab database the service is pointed at below, opened here the way the service opens it.
    scratch = get_settings().with_changes(lab={"lab_db": lab_db, "corrections_images_dir": corrections_dir})
    stores.accounts(scratch).add_user(USER, PASSWORD, ["pathologist"])
    images = read_images(None)

    port = free_port()
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "HEMATOVISION_LAB_DB": str(lab_db),
        "HEMATOVISION_CORRECTIONS_IMAGES_DIR": str(corrections_dir),
        "HEMATOVISION_PREDICTIONS_DB": str(workdir / "predictions.sqlite"),
        "HEMATOVISION_IMAGES_DIR": str(workdir / "images"),
        "HEMATOVISION_REVIEW_THRESHOLD": "1.0",
        "HEMATOVISION_REVIEW_IMAGE_DAYS": "30",
        "BENTOML_HOME": str(workdir / "bentoml-home"),
        # predictions open to anyone (as for a public demo): the queue is filled before signing in,
        # and this measures the review page, not sign-in
        "HEMATOVISION_PREDICT_REQUIRES_TOKEN": "false",
    }
    registry = "this checkout's mlruns/"
    if not (ROOT / "mlruns" / "mlflow.db").exists() and not os.environ.get("HEMATOVISION_MLFLOW_TRACKING_URI"):
        # only read: the service follows the alias, it never writes the registry
        env["HEMATOVISION_MLFLOW_TRACKING_URI"] = f"sqlite:///{MAIN_REGISTRY / 'mlflow.db'}"
        env["HEMATOVISION_MLFLOW_ARTIFACT_LOCATION"] = str(MAIN_REGISTRY / "artifacts")
        registry = f"{MAIN_REGISTRY}/ (read-only)"
    base = f"http://127.0.0.1:{port}"
    server = Server(
        "bentoml (ours)",
        [str(BIN / "bentoml"), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)],
        env,
        f"{base}/readyz",
        workdir / "bentoml.log",
    )
    driver = None
    answered: list[str] = []
    try:
        startup = server.wait_ready()
        model_version = requests.get(f"{base}/model", timeout=30).json().get("version")
        print(
            f"service ready in {startup:.0f} s (champion v{model_version}); filling the queue with {queue_size}",
            flush=True,
        )
        session = requests.Session()
        predicted = flagged = 0
        for name, data in images:  # confidence 1.0 (float32 rounding) is not below the threshold 1.0: skipped
            response = session.post(f"{base}/predict", files={"image": (name, data)}, timeout=120)
            assert response.status_code == 200, response.text
            predicted += 1
            flagged += response.json()["needs_review"]
            if flagged == queue_size:
                break
        assert flagged == queue_size, f"only {flagged} of {predicted} TEST images need review"
        login = session.post(f"{base}/login", data={"username": USER, "password": PASSWORD}, timeout=30)
        in_queue = len(session.get(f"{base}/review/queue", params={"limit": 500}, timeout=30).json()["items"])
        assert login.status_code == 200 and in_queue == queue_size, (login.status_code, in_queue)

        driver = browser()
        driver.get(f"{base}/ui/login.html?next=review.html")
        driver.find_element(By.ID, "username").send_keys(USER)
        driver.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
        wait(driver, lambda d: d.current_url.endswith("/ui/review.html"), "signed in and on the review page")
        wait(driver, lambda d: USER in d.find_element(By.ID, "whoami").text, "the user in the header")
        driver.execute_script(HOOK)
        driver.set_script_timeout(120)
        print(f"signed in; reviewing {args.items} items", flush=True)

        current = driver.execute_async_script(WAIT_SHOWN, 1)
        for n in range(args.items):
            if args.think_ms:
                time.sleep(args.think_ms / 1000)
            answered.append(current)
            ActionChains(driver).send_keys(KEYS[n % len(KEYS)]).perform()
            current = driver.execute_async_script(WAIT_SHOWN, n + 2)
            assert current not in answered, f"item {current} shown again after its answer"
        wait(driver, lambda d: d.find_element(By.ID, "reviewed-count").text == str(args.items), "the reviewed count")
        bench = driver.execute_script("return window.__reviewBench")
        page_messages = driver.find_element(By.ID, "message").text
    finally:
        if driver is not None:
            driver.quit()
        server.stop()

    keys, shown = bench["keys"], bench["shown"]
    assert len(keys) == args.items and len(shown) == args.items + 1, (len(keys), len(shown), page_messages)
    waits, inserted = [], []
    for key, nxt in zip(keys, shown[1:]):
        assert nxt["inserted"] > key["t"] and nxt["id"] != key["id"]
        waits.append(nxt["painted"] - key["t"])
        inserted.append(nxt["inserted"] - key["t"])
    span_ms = shown[-1]["painted"] - shown[0]["painted"]  # first image on screen to the last: items answered in it
    per_minute = args.items / (span_ms / 60000)
    with_gradcam = sum(s["gradcam"] for s in shown[1:])
    slow = [n + 1 for n, w in enumerate(waits) if w > 100]

    store = stores.corrections(scratch)
    stored = store.count()
    stored_ids = store.reviewed_prediction_ids()
    ok = stored == args.items and stored_ids == set(answered) and with_gradcam == args.items
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "src"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    lines = [
        f"\n## Review page — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}{' (with uncommitted changes in src/)' if dirty else ''}; champion v{model_version} from "
        f"{registry}; review_threshold 1.0, review images kept; queue filled with {queue_size} TEST images "
        f"(classes interleaved) via POST /predict ({predicted} predicted; {predicted - flagged} had confidence 1.0 "
        f"and so no review)",
        f"- headless Chromium ({CHROMIUM}), signed in through the login page as a pathologist; {args.items} items "
        f"reviewed, one class key each (1-4, e/l/m/n in turn), {args.think_ms:.0f} ms pause after each image appeared",
        f"- key press to the next item's image on screen (in-page performance.now(): keydown to the frame after "
        f"img.decode()): p50 {percentile(waits, 50):.0f} ms, p95 {percentile(waits, 95):.0f} ms, "
        f"max {max(waits):.0f} ms (image put in the page: p50 {percentile(inserted, 50):.0f} ms); "
        f"{with_gradcam} of {args.items} next items shown with their Grad-CAM; over 100 ms: {len(slow)} presses"
        + (f" (press no. {', '.join(map(str, slow[:10]))}{' …' if len(slow) > 10 else ''})" if slow else ""),
        f"- sustained: {per_minute:.0f} items/min ({args.items} items in {span_ms / 1000:.1f} s, first image to last)",
        f"- corrections in the store: {stored} of {args.items}, the answered items exactly: "
        f"{'yes' if stored_ids == set(answered) else 'no'} — {'PASS' if ok else 'FAIL'}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        record(lines)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
