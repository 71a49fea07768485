"""The web pages for people, in a real headless Chromium (Debian's chromium + chromium-driver)
against the session's real service: predicting with Grad-CAM and a CSV download, reviewing with
the keyboard (the corrections must really be stored), and the lab statistics. Cells of types the
session's model never saw (real immature granulocytes and an erythroblast of the second laboratory)
come back ``unknown`` from its fitted open-set threshold: every page must show them as such, and
the review page must offer the laboratory's whole vocabulary by keyboard.

Set HV_SCREENSHOTS=DIR to keep a screenshot of each page (for looking at them, not committed)."""

from __future__ import annotations

import csv
import io
import os
import re
import time
from pathlib import Path

import pytest
import requests

from hematovision import CLASSES, stores
from hematovision.model.open_set import UNKNOWN
from hematovision.serving.prediction_log import PredictionStore

from conftest import BLOOD_CELLS, SHARED, add_user, service_env, start_service, stop_service

os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager: no statistics, and it is never run (paths given)

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PASSWORD = "web pages need a long one"
UPLOADS = [
    sorted((BLOOD_CELLS / "TEST" / c.upper()).glob("*.jpeg"))[6] for c in ("eosinophil", "lymphocyte", "monocyte")
]
TO_REVIEW = [p for c in CLASSES for p in sorted((BLOOD_CELLS / "TEST" / c.upper()).glob("*.jpeg"))[7:9]]
# Real cells of types the session's model was never trained on, from the second laboratory. Its
# quick model's open-set threshold answered 6 of 6 immature granulocytes and 5 of 6 erythroblasts
# (the first of each folder) unknown when these tests were written; each test compares with the
# service's own answer for the same image and only needs some of them to be unknown.
IMMATURE = sorted((SHARED / "pbc-other" / "ig").glob("*.jpg"))
UNFAMILIAR = [*IMMATURE[:2], sorted((SHARED / "pbc-other" / "erythroblast").glob("*.jpg"))[1]]
UNFAMILIAR_TO_REVIEW = IMMATURE[2:6]
CSV_COLUMNS = [
    "filename",
    "label",
    "unknown",
    "confidence",
    "open_set_score",
    *(f"p_{c}" for c in CLASSES),
    "needs_review",
    "cell_in_view",
    "model_version",
    "prediction_id",
    "error",
]
WAIT = 60

# Skipped on a developer's machine without them; never in CI, which installs them (.ci/run).
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def web_people(project):
    add_user("wendy", "pathologist", password=PASSWORD)
    add_user("wanda", "ops", password=PASSWORD)  # locked out by the sign-in limit test
    add_user("ellie", "engineer", password=PASSWORD)
    return {"pathologist": "wendy"}


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
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
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            # a second CSV from the same page is not held for a permission prompt
            "profile.default_content_setting_values.automatic_downloads": 1,
        },
    )
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = WAIT, message: str = ""):
    try:
        # A page that re-renders (after a click, a refresh) replaces elements between find and read.
        return WebDriverWait(
            driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
        ).until(condition, message)
    except TimeoutException:
        page = driver.execute_script("return document.body ? document.body.innerText : ''")
        raise AssertionError(
            f"timed out waiting for {message or 'the page'} on {driver.current_url}:\n{page[:3000]}"
        ) from None


def snap(driver, name: str) -> None:
    folder = os.environ.get("HV_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def loaded(driver, css: str) -> bool:
    """Whether the image matched by ``css`` exists and decoded (naturalWidth > 0)."""
    return bool(
        driver.execute_script(
            "const i = document.querySelector(arguments[0]); return !!i && i.complete && i.naturalWidth > 0;", css
        )
    )


def sign_in_browser(driver, url: str, name: str, password: str = PASSWORD, then: str | None = None) -> None:
    """Sign in on the login page; with ``then`` (a page name), wait until it leads there."""
    driver.get(f"{url}/ui/login.html" + (f"?next={then}" if then else ""))
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password + Keys.ENTER)
    if then:
        wait(driver, lambda d: d.current_url.endswith(f"/ui/{then}"), message=f"signed in and on {then}")
        wait(driver, lambda d: name in d.find_element(By.ID, "whoami").text, message=f"{name} in the header")


def download_csv(driver, downloads: Path) -> list[dict]:
    """Click the page's CSV button; the rows of the file the browser saved."""
    for old in downloads.iterdir():
        old.unlink()
    wait(driver, lambda d: d.find_element(By.ID, "download-csv").is_enabled(), message="the CSV button")
    driver.find_element(By.ID, "download-csv").click()
    # Chromium may show the file under its final name before its bytes are written (CI once read it
    # empty), so wait for the page's CSV to be complete: it always ends with a line break.
    deadline = time.monotonic() + 20
    while not (
        (saved := list(downloads.glob("*.csv")))
        and saved[0].read_bytes().endswith(b"\r\n")
        and not list(downloads.glob("*.crdownload"))
    ):
        assert time.monotonic() < deadline, (
            f"no complete CSV was downloaded into {downloads}: {list(downloads.iterdir())}"
        )
        time.sleep(0.2)
    reader = csv.DictReader(io.StringIO(saved[0].read_text(encoding="utf-8")))
    assert reader.fieldnames == CSV_COLUMNS
    return list(reader)


@pytest.mark.e2e
def test_predict_page_shows_each_image_with_grad_cam_and_downloads_csv(
    project, serving_champion, browser, downloads, tmp_path
):
    service_url = serving_champion  # the page's answers and /predict's must come from one version
    browser.get(f"{service_url}/")
    assert browser.current_url.endswith("/ui/")
    model = requests.get(f"{service_url}/model", timeout=10).json()
    wait(browser, lambda d: f"version {model['version']}" in d.find_element(By.ID, "model-line").text)
    nav = [a.text for a in browser.find_elements(By.CSS_SELECTOR, ".topbar nav a")]
    assert nav == ["Predict", "Review", "Lab statistics", "Ops", "API docs"]
    wait(browser, lambda d: "not signed in" in d.find_element(By.ID, "whoami").text)

    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in UPLOADS))
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == 3, message="3 results")
    wait(
        browser,
        lambda d: all(loaded(d, f'.result[data-name="{p.name}"] img.gradcam') for p in UPLOADS),
        message="every Grad-CAM overlay loaded",
    )
    snap(browser, "predict")

    store = PredictionStore(project / "monitoring" / "predictions.sqlite")
    for path in UPLOADS:
        card = browser.find_element(By.CSS_SELECTOR, f'.result[data-name="{path.name}"]')
        expected = requests.post(
            f"{service_url}/predict", files={"image": (path.name, path.read_bytes())}, timeout=60
        ).json()
        assert card.get_attribute("data-label") == expected["label"]
        shown = "unknown cell type" if expected["unknown"] else expected["label"]  # a TEST cell may be unknown too
        assert card.find_element(By.CSS_SELECTOR, ".label").text.lower() == shown
        # The page's batch and this lone request differ in the last float digits: compare within rounding.
        confidence = card.find_element(By.CSS_SELECTOR, ".confidence").text
        assert confidence.endswith(" %") and float(confidence[:-2]) == pytest.approx(
            100 * expected["confidence"], abs=0.11
        )
        meter = card.find_element(By.CSS_SELECTOR, ".conf [role=meter]")
        assert float(meter.get_attribute("aria-valuenow")) == pytest.approx(expected["confidence"], abs=1e-3)
        rows = card.find_elements(By.CSS_SELECTOR, "table.probs tr")
        assert sorted(r.get_attribute("data-class") for r in rows) == sorted(CLASSES)
        top = max(expected["probabilities"], key=expected["probabilities"].get)
        assert rows[0].get_attribute("data-class") == top  # largest first
        badge = card.find_element(By.CSS_SELECTOR, ".badge").text
        assert badge == ("needs review" if expected["needs_review"] else "confident")
        # A cell cut by the picture's edge, or none found, is said under the label; a whole one is not.
        assert len(card.find_elements(By.CSS_SELECTOR, ".view-note")) == (expected["cell_in_view"] != "whole")
        assert loaded(browser, f'.result[data-name="{path.name}"] img.original')

    rows = download_csv(browser, downloads)
    assert [r["filename"] for r in rows] == [p.name for p in UPLOADS]
    for row in rows:
        assert row["label"] in (*CLASSES, UNKNOWN) and row["error"] == "" and row["model_version"] == model["version"]
        assert row["unknown"] == str(row["label"] == UNKNOWN).lower()
        probabilities = {c: float(row[f"p_{c}"]) for c in CLASSES}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert float(row["confidence"]) == pytest.approx(max(probabilities.values()), abs=1e-5)
        logged = store.get(row["prediction_id"])  # the id is the service's: the prediction was logged
        assert logged is not None and logged["label"] == row["label"]
        assert row["needs_review"] == str(logged["needs_review"] == 1).lower()
        assert row["cell_in_view"] in {"whole", "cut", "none"}
        if logged["open_set_score"] is None:  # a model saved without an open set
            assert row["open_set_score"] == ""
        else:
            assert float(row["open_set_score"]) == pytest.approx(logged["open_set_score"], rel=1e-4)

    # A bad file among good ones: its error in its place, the others classified as usual.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff this is not really a jpeg")
    good = sorted((BLOOD_CELLS / "TEST" / "NEUTROPHIL").glob("*.jpeg"))[6]
    browser.find_element(By.ID, "files").send_keys(f"{broken}\n{good}")
    wait(
        browser,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == 4
            and len(d.find_elements(By.CSS_SELECTOR, ".result.failed")) == 1
        ),
        message="one failed, four done",
    )
    failed = browser.find_element(By.CSS_SELECTOR, ".result.failed")
    assert failed.get_attribute("data-name") == "broken.jpg"
    refused = requests.post(f"{service_url}/predict", files={"image": ("broken.jpg", broken.read_bytes())}, timeout=60)
    assert refused.status_code == 422 and failed.find_element(By.CSS_SELECTOR, ".err").text == refused.json()["error"]
    assert failed.find_element(By.CSS_SELECTOR, ".detail").text
    wait(browser, lambda d: loaded(d, f'.result[data-name="{good.name}"] img.gradcam'))
    assert "5 images: 4 classified" in browser.find_element(By.ID, "counts").text
    rows = download_csv(browser, downloads)
    assert len(rows) == 5 and [r["filename"] for r in rows if r["error"]] == ["broken.jpg"]
    assert rows[-1]["filename"] == good.name and rows[-1]["label"] in (*CLASSES, UNKNOWN)


@pytest.mark.e2e
def test_predict_page_shows_a_cell_the_model_does_not_know_as_unknown(serving_champion, browser, downloads):
    """Real cells of types the model never saw: the ones its open-set threshold rejects are shown as
    unknown (with what they resemble, going to review), never as their top class; the CSV says so."""
    service_url = serving_champion
    browser.get(f"{service_url}/ui/")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in UNFAMILIAR))
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == len(UNFAMILIAR), message="results")
    answers = {
        p.name: requests.post(f"{service_url}/predict", files={"image": (p.name, p.read_bytes())}, timeout=60).json()
        for p in UNFAMILIAR
    }
    unknown = [name for name, answer in answers.items() if answer["unknown"]]
    assert unknown, f"the model's open-set threshold answered none of these unknown: {answers}"
    snap(browser, "predict-unknown")
    for name, answer in answers.items():
        card = browser.find_element(By.CSS_SELECTOR, f'.result[data-name="{name}"]')
        assert card.get_attribute("data-label") == answer["label"]
        label = card.find_element(By.CSS_SELECTOR, ".label").text
        if answer["unknown"]:
            assert answer["label"] == UNKNOWN and answer["needs_review"] and answer["open_set_score"] is not None
            top = max(answer["probabilities"], key=answer["probabilities"].get)
            assert label == "Unknown cell type"
            assert card.find_element(By.CSS_SELECTOR, ".unknown-note .resembles").text.lower() == top
            assert "review" in card.find_element(By.CSS_SELECTOR, ".unknown-note").text
            assert card.find_element(By.CSS_SELECTOR, ".badge").text == "needs review"
            assert not card.find_elements(By.CSS_SELECTOR, "table.probs tr.top")  # no class put forward as its type
        else:
            assert label.lower() == answer["label"] and not card.find_elements(By.CSS_SELECTOR, ".unknown-note")
        # The page asked for this cell in a batch, the test alone: the float arithmetic differs in the last
        # digits, so the shown score is compared with a tolerance, not as text rounded to one decimal.
        shown = re.search(r"open-set score (-?[\d.]+)", card.find_element(By.CSS_SELECTOR, ".meta").text)
        assert shown and float(shown.group(1)) == pytest.approx(answer["open_set_score"], rel=1e-4, abs=0.1)
    assert f"{len(unknown)} unknown" in browser.find_element(By.ID, "counts").text

    rows = download_csv(browser, downloads)
    assert [r["filename"] for r in rows] == [p.name for p in UNFAMILIAR]
    for row in rows:
        answer = answers[row["filename"]]
        assert row["label"] == answer["label"] and row["unknown"] == str(answer["unknown"]).lower()
        assert float(row["open_set_score"]) == pytest.approx(answer["open_set_score"], rel=1e-4)
        assert row["needs_review"] == str(answer["needs_review"]).lower()


@pytest.mark.e2e
def test_review_page_corrects_three_with_the_keyboard(project, service_url, browser, web_people):
    for path in TO_REVIEW:  # fill the queue (the test service flags nearly every answer needs_review)
        assert (
            requests.post(
                f"{service_url}/predict", files={"image": (path.name, path.read_bytes())}, timeout=60
            ).status_code
            == 200
        )
    api = requests.Session()
    login = api.post(f"{service_url}/login", data={"username": "wendy", "password": PASSWORD}, timeout=30)
    assert login.status_code == 200
    before = api.get(f"{service_url}/feedback/stats", timeout=30).json()

    browser.get(f"{service_url}/ui/review.html")  # not signed in yet
    wait(browser, lambda d: "Sign in" in d.find_element(By.ID, "message").text)
    sign_in_browser(browser, service_url, "wendy", "not the password")
    wait(browser, lambda d: "Wrong user name or password" in d.find_element(By.ID, "message").text)
    snap(browser, "login")
    sign_in_browser(browser, service_url, "wendy", then="review.html")

    chosen: dict[str, tuple[str, str]] = {}  # prediction id -> (predicted, corrected)
    for n in range(3):
        wait(
            browser,
            lambda d: d.find_element(By.ID, "item").get_attribute("data-prediction-id") not in (None, "", *chosen),
            message="the next item",
        )
        wait(browser, lambda d: loaded(d, "img.image") and loaded(d, "img.gradcam"), message="image and Grad-CAM")
        if n == 0:
            snap(browser, "review")
            hints = browser.find_element(By.ID, "answers").text
            assert all(f"{i + 1}" in hints and c.title() in hints for i, c in enumerate(CLASSES))
        item = browser.find_element(By.ID, "item")
        prediction_id = item.get_attribute("data-prediction-id")
        if item.get_attribute("data-unknown") == "true":  # an unfamiliar cell of another test: no type to confirm
            assert not browser.find_elements(By.CSS_SELECTOR, "#answers button.predicted")
            predicted, corrected = UNKNOWN, CLASSES[n % len(CLASSES)]
        else:
            predicted = browser.find_element(By.CSS_SELECTOR, "#answers button.predicted").get_attribute("data-class")
            corrected = CLASSES[(CLASSES.index(predicted) + 1 + n) % len(CLASSES)]
        if n == 0:  # a comment, then back out of the text box with Esc so the keys answer again
            comment = browser.find_element(By.ID, "comment")
            comment.send_keys("smudged, checked at 100x")
            comment.send_keys(Keys.ESCAPE)
        ActionChains(browser).send_keys(str(CLASSES.index(corrected) + 1)).perform()
        chosen[prediction_id] = (predicted, corrected)
        wait(
            browser, lambda d, k=n + 1: d.find_element(By.ID, "reviewed-count").text == str(k), message=f"count {n + 1}"
        )
    assert browser.find_element(By.ID, "reviewed-split").text == "0 confirmed · 3 corrected"

    after = api.get(f"{service_url}/feedback/stats", timeout=30).json()
    assert after["corrections"] == before["corrections"] + 3
    assert after["overall"]["confirmed"] == before["overall"]["confirmed"]
    added = {
        pair: n - confusion_cells(before).get(pair, 0)
        for pair, n in confusion_cells(after).items()
        if n != confusion_cells(before).get(pair, 0)
    }
    expected: dict[tuple[str, str], int] = {}
    for pair in chosen.values():
        expected[pair] = expected.get(pair, 0) + 1
    assert added == expected
    exported = [
        r
        for r in csv.DictReader(io.StringIO(api.get(f"{service_url}/feedback/export.csv", timeout=30).text))
        if r["reviewer"] == "wendy"
    ]
    assert {r["prediction_id"]: (r["predicted_class"], r["true_class"]) for r in exported} == chosen
    assert sorted(r["comment"] for r in exported) == ["", "", "smudged, checked at 100x"]
    queue = {i["id"] for i in api.get(f"{service_url}/review/queue", params={"limit": 500}, timeout=30).json()["items"]}
    assert not queue & set(chosen)  # reviewed items left the queue


def confusion_cells(stats: dict) -> dict[tuple[str, str], int]:
    """/feedback/stats' confusion as {(predicted, corrected): count}: rows are the model's answers
    (``predicted``: its classes and ``unknown``), columns what reviewers may answer (``classes``)."""
    confusion = stats["confusion"]
    return {
        (predicted, corrected): n
        for predicted, row in zip(confusion["predicted"], confusion["matrix"])
        for corrected, n in zip(confusion["classes"], row)
    }


@pytest.mark.e2e
def test_review_page_names_unknown_cells_with_the_vocabulary_by_keyboard(service_url, browser, web_people):
    """The queue filtered to cells the model did not know; each is named with a type of the
    laboratory's vocabulary by keyboard alone: a type's digit key, a letter starting the type-ahead,
    and ``/`` then part of a name. The stored corrections have those types."""
    unknown_ids = []
    for path in UNFAMILIAR_TO_REVIEW:
        answer = requests.post(
            f"{service_url}/predict", files={"image": (path.name, path.read_bytes())}, timeout=60
        ).json()
        if answer["unknown"]:
            assert answer["needs_review"]
            unknown_ids.append(answer["prediction_id"])
    assert len(unknown_ids) >= 3, "the model's open-set threshold answered too few immature granulocytes unknown"
    api = requests.Session()
    assert api.post(f"{service_url}/login", data={"username": "wendy", "password": PASSWORD}, timeout=30).ok
    queue = api.get(f"{service_url}/review/queue", params={"label": UNKNOWN, "limit": 500}, timeout=30).json()
    types = queue["classes"]
    assert types == list(stores.answerable_types()) and len(types) > len(CLASSES) and UNKNOWN not in types
    assert set(unknown_ids) <= {i["id"] for i in queue["items"]}
    assert all(i["label"] == UNKNOWN and i["unknown"] for i in queue["items"])
    resembles = {i["id"]: max(i["probabilities"], key=i["probabilities"].get) for i in queue["items"]}

    sign_in_browser(browser, service_url, "wendy", then="review.html")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#answers button")) == len(types), message="buttons")
    buttons = browser.find_elements(By.CSS_SELECTOR, "#answers button")
    assert [b.get_attribute("data-class") for b in buttons] == types  # every type of the vocabulary, in order
    for i, button in enumerate(buttons):
        keys = button.get_attribute("data-keys").split()
        hints = [k.text for k in button.find_elements(By.TAG_NAME, "kbd")]
        assert (str(i + 1) in keys) == (i < 9) and hints  # a digit for the first nine, a visible hint on each
        assert button.get_attribute("aria-label").lower().startswith(types[i])
    Select(browser.find_element(By.ID, "f-label")).select_by_value(UNKNOWN)
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait(  # the filtered queue shown (until it arrives the page hides the item, and its counts)
        browser,
        lambda d: (
            d.find_element(By.ID, "item").get_attribute("data-prediction-id") not in (None, "")
            and d.find_element(By.ID, "reviewed-count").text
        ),
        message="the filtered queue",
    )

    digit_type = next(t for i, t in enumerate(types[:9]) if t not in CLASSES)  # e.g. basophil, on 5
    plans = [  # keys pressed -> the type they name
        ([str(types.index(digit_type) + 1)], digit_type),
        (["e", "ry", Keys.ENTER], "erythroblast"),  # e starts eosinophil and erythroblast: the type-ahead
        (["/", "smudge", Keys.ENTER], "smudge cell"),
    ]
    count = int(browser.find_element(By.ID, "reviewed-count").text)
    chosen: dict[str, str] = {}
    for n, (keys, true_class) in enumerate(plans):
        wait(
            browser,
            lambda d: (
                d.find_element(By.ID, "item").get_attribute("data-prediction-id") not in (None, "", *chosen)
                and d.find_element(By.ID, "item").get_attribute("data-unknown") == "true"
            ),
            message="the next unknown item",
        )
        prediction_id = browser.find_element(By.ID, "item").get_attribute("data-prediction-id")
        assert prediction_id in resembles
        label = browser.find_element(By.ID, "item-label").text
        assert (
            label.startswith("Model says: unknown cell type — resembles ") and resembles[prediction_id] in label.lower()
        )
        assert not browser.find_elements(By.CSS_SELECTOR, "#answers button.predicted")
        if n == 0:
            snap(browser, "review-unknown")
            ActionChains(browser).send_keys(Keys.ENTER).perform()  # nothing to confirm: not saved
            wait(browser, lambda d: "named no type" in d.find_element(By.ID, "flash").text, message="no confirming")
        for k, key in enumerate(keys):
            ActionChains(browser).send_keys(key).perform()
            if k == 0 and key in ("e", "/"):
                wait(browser, lambda d: d.switch_to.active_element.get_attribute("id") == "type-ahead", message="focus")
        if n == 1:
            assert browser.find_element(By.ID, "type-ahead").get_attribute("value") == ""  # answered and emptied
        chosen[prediction_id] = true_class
        wait(
            browser,
            lambda d, k=count + n + 1: d.find_element(By.ID, "reviewed-count").text == str(k),
            message=f"{true_class} saved",
        )
        assert browser.find_element(By.ID, "flash").text == f"Saved: unknown → {true_class.capitalize()}."

    exported = {
        r["prediction_id"]: (r["predicted_class"], r["true_class"])
        for r in csv.DictReader(io.StringIO(api.get(f"{service_url}/feedback/export.csv", timeout=30).text))
        if r["reviewer"] == "wendy"
    }
    assert {i: exported[i] for i in chosen} == {i: (UNKNOWN, t) for i, t in chosen.items()}
    left = api.get(f"{service_url}/review/queue", params={"label": UNKNOWN, "limit": 500}, timeout=30).json()
    assert not {i["id"] for i in left["items"]} & set(chosen)


@pytest.mark.e2e
def test_lab_page_shows_the_statistics_and_signing_out(service_url, browser, web_people):
    api = requests.Session()
    login = api.post(f"{service_url}/login", data={"username": "wendy", "password": PASSWORD}, timeout=30)
    assert login.status_code == 200
    image = TO_REVIEW[0].read_bytes()  # at least one review, whichever tests ran before
    assert (
        api.post(
            f"{service_url}/feedback",
            files={"image": ("cell.jpeg", image)},
            data={"true_class": "monocyte"},
            headers={"X-CSRF-Token": login.json()["csrf_token"]},
            timeout=30,
        ).status_code
        == 201
    )
    # and one of a cell the model did not know, named with a type of the laboratory's vocabulary
    unfamiliar = IMMATURE[6]
    answer = requests.post(
        f"{service_url}/predict", files={"image": (unfamiliar.name, unfamiliar.read_bytes())}, timeout=60
    ).json()
    reviewed = api.post(
        f"{service_url}/feedback",
        data={"prediction_id": answer["prediction_id"], "true_class": "immature granulocyte"},
        headers={"X-CSRF-Token": login.json()["csrf_token"]},
        timeout=30,
    )
    assert reviewed.status_code == 201 and reviewed.json()["predicted_class"] == answer["label"]
    stats = api.get(f"{service_url}/feedback/stats", timeout=30).json()
    assert UNKNOWN in stats["confusion"]["predicted"] and "immature granulocyte" in stats["confusion"]["classes"]

    sign_in_browser(browser, service_url, "wendy", then="lab.html")
    wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "#tile-corrections .value").text == str(stats["corrections"]),
        message="the number of reviews",
    )
    snap(browser, "lab")
    overall = stats["overall"]
    assert browser.find_element(By.CSS_SELECTOR, "#tile-agreement .value").text == f"{100 * overall['agreement']:.1f} %"
    for predicted, group in stats["per_class"].items():
        row = browser.find_element(By.CSS_SELECTOR, f'#per-class tr[data-key="{predicted}"]')
        cells = [c.text for c in row.find_elements(By.CSS_SELECTOR, "td.num")]
        assert cells[:2] == [str(group["reviewed"]), str(group["confirmed"])]
    assert browser.find_elements(By.CSS_SELECTOR, "#per-version tr[data-key]")
    assert browser.find_elements(By.CSS_SELECTOR, "#per-day tr[data-key]")
    cells = browser.execute_script(  # one round trip for every cell
        "return [...document.querySelectorAll('#confusion td[data-predicted]')]"
        ".map((td) => [td.dataset.predicted, td.dataset.corrected, td.textContent]);"
    )
    shown = {(predicted, corrected): text for predicted, corrected, text in cells}
    assert shown == {pair: str(n) for pair, n in confusion_cells(stats).items()}  # rows: predicted; columns: classes
    rows = [r.get_attribute("data-predicted") for r in browser.find_elements(By.CSS_SELECTOR, "#confusion tbody tr")]
    assert rows == stats["confusion"]["predicted"]
    unknown_row = browser.find_element(By.CSS_SELECTOR, '#confusion tr[data-predicted="unknown"] th')
    assert unknown_row.text.startswith("Unknown")
    if answer["unknown"]:  # as the model answered it: unknown, or the class it took it for
        assert int(shown[(UNKNOWN, "immature granulocyte")]) >= 1
        assert browser.find_element(By.CSS_SELECTOR, '#per-class tr[data-key="unknown"] th').text.startswith("Unknown")
    assert browser.find_element(By.ID, "export-csv").get_attribute("href").endswith("/feedback/export.csv")
    assert browser.find_element(By.ID, "report-pdf").get_attribute("href").endswith("/feedback/report.pdf")

    browser.find_element(By.ID, "signout").click()
    wait(browser, lambda d: d.current_url.endswith("/ui/login.html"))
    browser.get(f"{service_url}/ui/lab.html")
    wait(browser, lambda d: "signed-in staff" in d.find_element(By.ID, "message").text)
    assert not browser.find_element(By.ID, "stats").is_displayed()


@pytest.mark.e2e
def test_ops_page_shows_the_drift_status_and_an_engineer_approves_an_alert(project, service_url, browser, web_people):
    from hematovision.monitoring.monitor import MonitorState

    state = MonitorState(project / "monitoring" / "monitor.sqlite")  # the service's monitoring state
    alert = state.add_alert(
        "drift",
        "1",
        "images drift from model v1's reference (browser test)",
        {"signals": ["embeddings"]},
        "awaiting_approval",
    )
    browser.get(f"{service_url}/ui/ops.html")
    wait(
        browser,
        lambda d: "for ops, engineers and admins" in d.find_element(By.ID, "message").text,
        message="the sign-in notice",
    )
    sign_in_browser(browser, service_url, "ellie", then="ops.html")
    row = f'#alerts tr[data-alert="{alert["id"]}"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), message="the alert")
    assert "browser test" in browser.find_element(By.CSS_SELECTOR, row).text
    assert browser.find_element(By.ID, "status").text  # drifting, no drift, or no monitoring run yet
    assert browser.find_element(By.ID, "tile-trigger").text
    snap(browser, "ops")
    browser.find_element(By.CSS_SELECTOR, f"{row} button").click()
    wait(browser, lambda d: "approved (ellie)" in d.find_element(By.CSS_SELECTOR, row).text, message="the approval")
    assert state.alert(alert["id"])["status"] == "approved" and state.alert(alert["id"])["decided_by"] == "ellie"
    state.update_alert(alert["id"], status="open")  # nothing for a later monitoring run to start
    browser.find_element(By.ID, "signout").click()
    wait(browser, lambda d: d.current_url.endswith("/ui/login.html"))


@pytest.mark.e2e
def test_sign_in_page_explains_the_sign_in_limit(service_url, browser, web_people):
    from hematovision.settings import get_settings

    for attempt in range(get_settings().lab.login_attempts):
        sign_in_browser(browser, service_url, "wanda", f"wrong password {attempt}")
        wait(browser, lambda d: "Wrong user name or password" in d.find_element(By.ID, "message").text)
    sign_in_browser(browser, service_url, "wanda")  # the right password, too late
    wait(browser, lambda d: "Too many failed sign-ins" in d.find_element(By.ID, "message").text, message="the limit")
    seconds = int(browser.find_element(By.ID, "message").text.split("Try again in ")[1].split()[0])
    assert 0 < seconds <= get_settings().lab.login_window_seconds + 1
    wait(browser, lambda d: "not signed in" in d.find_element(By.ID, "whoami").text)


def test_every_page_links_the_shared_style_and_nothing_external():
    web = Path(__file__).resolve().parents[2] / "src" / "hematovision" / "web"
    for name in ("index.html", "login.html", "review.html", "lab.html", "ops.html"):
        html = (web / name).read_text()
        assert 'href="style.css"' in html and 'src="common.js"' in html, name
        assert "http://" not in html and "https://" not in html, f"{name} loads something from outside"


@pytest.mark.e2e
def test_predict_page_asks_to_sign_in_on_a_service_with_the_default_settings(
    project, trained, browser, web_people, tmp_path_factory
):
    """The session's shared service is opened for anonymous predictions (conftest); this one runs
    as shipped: predicting needs a sign-in or an API token."""
    env = service_env(tmp_path_factory)
    env.pop("HEMATOVISION_PREDICT_REQUIRES_TOKEN")
    server, url = start_service(project, tmp_path_factory.mktemp("default-settings") / "service.log", env)
    try:
        anonymous = requests.post(
            f"{url}/predict", files={"image": (UPLOADS[0].name, UPLOADS[0].read_bytes())}, timeout=60
        )
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"

        browser.get(f"{url}/ui/")
        wait(browser, lambda d: "not signed in" in d.find_element(By.ID, "whoami").text)
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in UPLOADS[:2]))
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.failed")) == 2, message="refusals")
        message = browser.find_element(By.ID, "message")
        assert "Predicting needs a sign-in" in message.text, message.text
        link = message.find_element(By.LINK_TEXT, "Sign in")
        assert link.get_attribute("href") == f"{url}/ui/login.html?next=index.html"
        # No half-made result: each image says it was not classified and why, nothing else.
        assert not browser.find_elements(By.CSS_SELECTOR, ".result.done, .result.pending, .probs, img.gradcam")
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".result.failed .err")] == [
            "sign-in required"
        ] * 2
        assert "2 not classified" in browser.find_element(By.ID, "counts").text
        snap(browser, "predict-sign-in-required")

        link.click()  # the link leads to the sign-in page, and back here once signed in
        wait(browser, lambda d: d.current_url.endswith("/ui/login.html?next=index.html"), message="the sign-in page")
        browser.find_element(By.ID, "username").send_keys("wendy")
        browser.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
        wait(browser, lambda d: d.current_url.endswith("/ui/index.html"), message="back on the predict page")
        wait(browser, lambda d: "wendy" in d.find_element(By.ID, "whoami").text, message="wendy in the header")
        browser.find_element(By.ID, "files").send_keys(str(UPLOADS[0]))  # signed in by the session cookie, no API token
        wait(browser, lambda d: loaded(d, ".result.done img.gradcam"), message="a prediction once signed in")
        assert not browser.find_element(By.ID, "message").text
        browser.find_element(By.ID, "signout").click()
        wait(browser, lambda d: d.current_url.endswith("/ui/login.html"))
    finally:
        stop_service(server)
