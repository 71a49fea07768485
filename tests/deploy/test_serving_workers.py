"""Serving workers are a setting: ``serving.workers`` (``HEMATOVISION_SERVE_WORKERS``) reaches BentoML
through its JSON config overrides, which ``hematovision serve`` and ``api/process.py`` set."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hematovision.api.process import OVERRIDES, SERVICE_NAME, with_workers

from conftest import REPO


def test_with_workers_keeps_other_overrides():
    env = with_workers({"PATH": "/bin", OVERRIDES: json.dumps({"api_server": {"http": {"cors": {}}}})}, 4)
    assert env["PATH"] == "/bin"
    assert json.loads(env[OVERRIDES]) == {
        "api_server": {"http": {"cors": {}}},
        "services": {SERVICE_NAME: {"workers": 4}},
    }
    assert json.loads(with_workers({}, 2)[OVERRIDES]) == {"services": {SERVICE_NAME: {"workers": 2}}}


@pytest.mark.e2e
def test_bentoml_starts_the_workers_the_setting_asks_for(tmp_path):
    """What BentoML's allocator would start for the service, in a fresh process (the service's own
    decorator says workers=1 and threads from the settings: the override changes only the workers)."""
    probe = (
        "from hematovision.api.service import HematoVision as S\n"
        "from _bentoml_impl.server.allocator import ResourceAllocator\n"
        "from bentoml._internal.configuration.containers import BentoMLContainer\n"
        "S.inject_config()\n"
        "print(ResourceAllocator().get_worker_env(S)[0], BentoMLContainer.config.services['hematovision'].get()['threads'])\n"
    )
    env = with_workers(
        {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "HEMATOVISION_SERVE_THREADS": "5",
            "KERAS_HOME": str(tmp_path),
        },
        3,
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["3", "5"]
