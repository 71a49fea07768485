"""``hematovision demo``: the whole story on the embedded defaults, with the real tools.

1. a champion exists (the training flow trains one if there is none; an existing one is reused);
2. the real service starts (``bentoml serve`` on 127.0.0.1, a free port);
3. official TEST images stream through ``POST /predict`` (no drift expected), then images of the new
   site (``pbc-sample``, 4 classes);
4. the drift monitor judges the logged predictions after each stream (no drift expected on TEST, drift
   on the new site) and raises its alerts;
5. a simulated pathologist (an account the demo creates) signs in and corrects part of the new-site
   predictions through ``POST /feedback``, labels from the folder names;
6. the monitor raises its corrections alert, an engineer (the demo) approves the alerts, and the
   retraining flow they start exports the corrections, trains a challenger and gates it;
7. once promoted, the demo waits until the service answers with the new version (it follows the
   alias on its own), then scores the same never-corrected new-site images and TEST images again.

The new-site images scored before/after are never corrected (so never trained on): a fixed quarter
of the new site's images (by a hash of the file name) is only ever scored, by every demo run.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hematovision import CLASSES, stores
from hematovision.api.process import start_service, stop_service
from hematovision.data.dataset import scan_class_folders, scan_kaggle
from hematovision.model.open_set import UNKNOWN
from hematovision.monitoring.monitor import RetrainingTrigger, run_monitoring
from hematovision.registry.registry import CHAMPION
from hematovision.settings import Settings

# The demo is an entry point like the CLI: it runs the Prefect flows (imported where they run, since
# Prefect takes seconds to import) and the HTTP client `requests` (a development dependency).

Say = Callable[[str], None]


@dataclass
class DemoConfig:
    profile: str | None = None
    params_file: str = "params.yaml"
    test_images: int = 200  # official TEST images streamed (before and after)
    new_site_images: int = 600  # new-site images streamed, of which `corrections` are corrected
    corrections: int = 400
    eval_images: int = 200  # new-site images never corrected, scored before and after
    new_site_dir: Path | None = None  # default: the new_site_source setting
    swap_timeout_s: float = 180.0
    service_timeout_s: float = 300.0
    workers: int = 4  # concurrent requests (the service batches them)
    seed: int = 7
    service_env: dict[str, str] | None = None  # extra environment of the service


def monitor(settings: Settings, say: Say, trigger: RetrainingTrigger | None = None) -> dict[str, Any]:
    """One run of the drift monitor (``hematovision.monitoring.monitor``) over what the service logged so far;
    prints the windows it judged and the alerts it raised; approved alerts start ``trigger``."""
    run = run_monitoring(settings, trigger=trigger)
    windows = run["windows"]
    drifting = [w for w in windows if w["drifting"]]
    signals = sorted({name for w in drifting for name, s in w["signals"].items() if s["drift"]})
    say(
        f"   {len(windows)} new windows of {settings.monitoring.window_size} predictions judged, {len(drifting)} drifting"
        + (f" ({', '.join(signals)})" if signals else "")
    )
    for alert in run["alerts"]:
        say(f"   ALERT {alert['kind']}: {alert['message']} [{alert['status']}]")
    return {
        "windows": len(windows),
        "drifting": len(drifting),
        "signals": signals,
        "alerts": [a["kind"] for a in run["alerts"]],
        "retraining": run["retraining"],
    }


def retrain_through_alerts(settings: Settings, say: Say, profile: str | None, params_file: str) -> dict[str, Any]:
    """The engineer approves the champion's open alerts and the monitor starts the retraining flow
    (as the ops page's approve button and the next monitoring run do); without an alert, the
    engineer starts the flow by hand. Returns the retraining flow's summary."""
    from flows.retraining import retraining_flow

    def retrain() -> dict[str, Any]:
        return retraining_flow(profile=profile, params_file=params_file)

    monitor(settings, say)  # the monitor counts the new corrections and raises its alert
    state = stores.monitor_state(settings)
    for alert in state.alerts(50, status=["awaiting_approval"]):
        state.approve(alert["id"], "demo-engineer")
        say(f"   demo-engineer approves alert {alert['id']} ({alert['kind']})")
    run = monitor(settings, say, trigger=retrain)
    if not run["retraining"]:
        say("   no alert calls for retraining yet: the engineer starts the retraining flow by hand")
        return retrain()
    outcome = run["retraining"][0]
    if outcome["status"] != "retrained":
        raise RuntimeError(
            f"retraining for alert {outcome['id']} ended {outcome['status']}: {outcome['detail'].get('error', '')}"
        )
    return outcome["detail"]["retraining"]


def _new_site_images(folder: Path, config: DemoConfig) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(streamed, scored-before-and-after) images of the 4 known classes: disjoint, balanced per
    class, the same on every run (seeded)."""
    rows, _unknown = scan_class_folders(folder)
    rng = random.Random(config.seed)
    per_class_stream = max(1, config.new_site_images // len(CLASSES))
    per_class_eval = max(1, config.eval_images // len(CLASSES))
    streamed, held = [], []
    for cls in CLASSES:
        paths = sorted(folder / p for p in rows[rows.label == cls].path)
        rng.shuffle(paths)
        # A quarter of the images (by a hash of the name) are only ever scored, never corrected,
        # whatever the counts of this run or of earlier runs against the same registry.
        scored_side = [p for p in paths if _scored_only(p)]
        corrected_side = [p for p in paths if not _scored_only(p)]
        held += [(p, cls) for p in scored_side[:per_class_eval]]
        streamed += [(p, cls) for p in corrected_side[:per_class_stream]]
    rng.shuffle(streamed)  # traffic of mixed classes, corrections spread over classes
    return streamed, held


def _scored_only(path: Path) -> bool:
    return int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16) % 4 == 0


def _test_images(settings: Settings, config: DemoConfig) -> list[tuple[Path, str]]:
    source = settings.path(settings.paths.data_source)
    rows = scan_kaggle(source)
    rows = rows[rows.split == "test"]
    picked = rows.sample(min(len(rows), config.test_images), random_state=config.seed) if len(rows) else rows
    return [(source / p, label) for p, label in zip(picked.path, picked.label)]


def _predict_all(url: str, images: list[tuple[Path, str]], workers: int, token: str) -> list[dict[str, Any]]:
    import requests

    def one(item: tuple[Path, str]) -> dict[str, Any]:
        path, label = item
        response = requests.post(
            f"{url}/predict",
            files={"image": (path.name, path.read_bytes())},
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
        )
        response.raise_for_status()
        return {**response.json(), "true_class": label, "path": path}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, images))


def _accuracy(results: list[dict[str, Any]]) -> float:
    """Share answered with the right class (an ``unknown`` answer is not one)."""
    return sum(r["label"] == r["true_class"] for r in results) / len(results) if results else float("nan")


def _unknown_share(results: list[dict[str, Any]]) -> float:
    return sum(r["label"] == UNKNOWN for r in results) / len(results) if results else float("nan")


def _served_version(url: str) -> str | None:
    import requests

    try:
        return requests.get(f"{url}/model", timeout=10).json().get("version")
    except (requests.RequestException, ValueError):
        return None


def run_demo(settings: Settings, config: DemoConfig | None = None, say: Say = print) -> dict[str, Any]:
    """Run the story end to end; returns the figures printed in the summary."""
    import requests

    config = config or DemoConfig()
    started = time.perf_counter()
    registry = stores.registry(settings)
    champion = registry.version_by_alias(CHAMPION)
    if champion is None:
        say("1. no champion yet: training one with the training flow")
        from flows.training import training_flow

        trained = training_flow(profile=config.profile, params_file=config.params_file)
        if not trained["gate"]["passed"]:
            raise RuntimeError("the first model did not pass the gate: " + "; ".join(trained["gate"]["reasons"]))
        champion = registry.version_by_alias(CHAMPION)
    else:
        say(f"1. reusing the champion v{champion.version}")
    before_version = str(champion.version)

    streamed, held = _new_site_images(config.new_site_dir or settings.path(settings.paths.new_site_source), config)
    test_images = _test_images(settings, config)
    log = settings.path(settings.paths.retrain_dir) / "demo-service.log"
    env = {**os.environ, **(config.service_env or {})}
    # The demo's pathologist: an account of its own, with an API token for the microscope's traffic
    # and a browser sign-in for the reviews; disabled when the demo ends, however it ends, so no
    # demo run leaves an account that can read patients' images behind.
    accounts = stores.accounts(settings)
    reviewer = f"demo-pathologist-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
    password = secrets.token_urlsafe(24)
    accounts.add_user(reviewer, password, ["pathologist"])
    say(f"2. starting the service (log {log}); demo account {reviewer}, disabled at the end")
    try:
        token = accounts.create_token(reviewer, "demo microscope", days=1)
        server, url = start_service(settings.path(settings.paths.project_dir), log, env, config.service_timeout_s)
    except BaseException:
        accounts.disable_user(reviewer)
        raise
    try:
        say(f"   serving v{_served_version(url)} at {url}")
        say(f"3. streaming {len(test_images)} official TEST images, then {len(streamed) + len(held)} new-site images")
        test_before = _predict_all(url, test_images, config.workers, token)
        say(f"   TEST accuracy {_accuracy(test_before):.3f}; drift monitor (no drift expected):")
        drift = {"in_distribution": monitor(settings, say)}
        held_before = _predict_all(url, held, config.workers, token)
        stream_results = _predict_all(url, streamed, config.workers, token)
        say(f"4. new-site accuracy {_accuracy(held_before + stream_results):.3f}; drift monitor (a new laboratory):")
        drift["new_site"] = monitor(settings, say)

        to_correct = stream_results[: config.corrections]
        session = requests.Session()
        login = session.post(f"{url}/login", data={"username": reviewer, "password": password}, timeout=30)
        login.raise_for_status()
        session.headers["X-CSRF-Token"] = login.json()["csrf_token"]
        say(f"5. {reviewer} reviews {len(to_correct)} new-site predictions")

        def review(result: dict[str, Any]) -> None:
            path = result["path"]
            response = session.post(
                f"{url}/feedback",
                files={"image": (path.name, path.read_bytes())},
                data={
                    "prediction_id": result["prediction_id"],
                    "true_class": result["true_class"],
                    "comment": "demo: label from the new site's folder",
                },
                timeout=60,
            )
            response.raise_for_status()

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(review, to_correct))
        changed = sum(r["label"] != r["true_class"] for r in to_correct)
        say(f"   {changed} corrected, {len(to_correct) - changed} confirmed")

        say("6. the monitor sees the corrections; retraining on them")
        retrain_started = time.perf_counter()
        summary = retrain_through_alerts(settings, say, config.profile, config.params_file)
        retrain_s = time.perf_counter() - retrain_started
        say(
            ("   PROMOTED " if summary["promoted"] else "   NOT promoted ")
            + f"v{summary['version']}: "
            + "; ".join(summary["gate"]["reasons"])
        )

        swapped, after_version = False, _served_version(url)
        if summary["promoted"]:
            say(f"7. waiting for the service to answer with v{summary['version']}")
            deadline = time.monotonic() + config.swap_timeout_s
            while time.monotonic() < deadline:
                after_version = _served_version(url)
                if after_version == summary["version"]:
                    swapped = True
                    break
                time.sleep(1)
        test_after = _predict_all(url, test_images, config.workers, token)
        held_after = _predict_all(url, held, config.workers, token)
    finally:
        stop_service(server)
        accounts.disable_user(reviewer)

    result = {
        "version_before": before_version,
        "version_after": after_version,
        "challenger": summary["version"],
        "promoted": summary["promoted"],
        "swapped": swapped,
        "gate": summary["gate"]["reasons"],
        "new_site_accuracy_before": _accuracy(held_before),
        "new_site_accuracy_after": _accuracy(held_after),
        "test_accuracy_before": _accuracy(test_before),
        "test_accuracy_after": _accuracy(test_after),
        "new_site_unknown_before": _unknown_share(held_before),
        "new_site_unknown_after": _unknown_share(held_after),
        "test_unknown_before": _unknown_share(test_before),
        "test_unknown_after": _unknown_share(test_after),
        "new_site_images_scored": len(held),
        "test_images_scored": len(test_images),
        "corrections": len(to_correct),
        "drift": drift,
        "retrain_holdout": {
            "champion": summary["champion"].get("holdout_accuracy"),
            "challenger": summary["challenger"].get("holdout_accuracy"),
        },
        "retrain_s": round(retrain_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    say("\nSummary (through the service)")
    say(f"  served version:        v{before_version} -> v{after_version}" + ("" if swapped else "  (no swap)"))
    say(
        f"  new-site accuracy:     {result['new_site_accuracy_before']:.3f} -> {result['new_site_accuracy_after']:.3f}"
        f"  ({len(held)} images never corrected)"
    )
    say(
        f"  TEST accuracy:         {result['test_accuracy_before']:.3f} -> {result['test_accuracy_after']:.3f}"
        f"  ({len(test_images)} images)"
    )
    say(
        f"  answered unknown:      new site {result['new_site_unknown_before']:.3f} -> "
        f"{result['new_site_unknown_after']:.3f}, TEST {result['test_unknown_before']:.3f} -> "
        f"{result['test_unknown_after']:.3f}  (cells beyond the model's open-set threshold, sent to review)"
    )
    for name, what in (("in_distribution", "drift on TEST traffic:"), ("new_site", "drift on new-site traffic:")):
        d = drift[name]
        say(
            f"  {what:<22} {d['drifting']}/{d['windows']} windows drifting"
            + (f"; alerts: {', '.join(d['alerts'])}" if d["alerts"] else "")
        )
    say(
        f"  corrections:           {len(to_correct)}; retraining {retrain_s:.0f} s; whole demo {result['total_s']:.0f} s"
    )
    return result
