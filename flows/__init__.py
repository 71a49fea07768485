"""Prefect flows: thin orchestration over the steps in ``hematovision.training.steps``."""

from __future__ import annotations

import time
from typing import Any, Callable


class StepTimer:
    """Runs a flow's steps and keeps each one's wall time (seconds), for the flow's summary."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, call: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        result = call(*args)
        self.timings[name] = round(time.perf_counter() - started, 1)
        return result
