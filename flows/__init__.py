"""Prefect flows: thin orchestration over the platform's steps (``hematovision.training.steps``,
``hematovision.training.retrain``, ``hematovision.monitoring.monitor``).

The flows sit above the library: they import it, it never imports them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import hematovision  # noqa: F401 - its import switches every tool's telemetry off before Prefect loads


class StepTimer:
    """Runs a flow's steps and keeps each one's wall time (seconds), for the flow's summary."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, call: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        result = call(*args)
        self.timings[name] = round(time.perf_counter() - started, 1)
        return result
