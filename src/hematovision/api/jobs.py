"""Slow work asked for over HTTP, run in a worker thread while the request answers at once.

Deliberately simple: an in-process table per serving worker. One job runs at a time in a worker
(a second request while one is queued or running is refused, naming the running job), and the
last ``KEEP`` jobs are remembered to be asked about. A job id is known only to the worker process
that took it and is forgotten when that process restarts; the service runs one worker
(``service.py``), and with several (or several replicas) a client asks the one that answered,
or reads the outcome from the audit log, where every job's outcome is written (by the caller's
``on_done`` / ``on_failed``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hematovision.database import utc_now

KEEP = 100
logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """A job is already queued or running in this worker."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} ({job.kind} {job.target}) is {job.status}; one job at a time")
        self.job = job


class JobFailed(Exception):
    """A job's failure with a message meant for people (other exceptions are reported by type and message)."""


@dataclass
class Job:
    id: str
    kind: str
    target: str
    requested_by: str
    status: str = "queued"  # queued -> running -> done | failed
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def public(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "requested_by": self.requested_by,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.status == "done":
            out["result"] = self.result
        if self.status == "failed":
            out["error"] = self.error
        return out


class JobTable:
    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def submit(
        self,
        kind: str,
        target: str,
        requested_by: str,
        work: Callable[[], dict[str, Any]],
        on_done: Callable[[Job], None] | None = None,
        on_failed: Callable[[Job], None] | None = None,
    ) -> Job:
        """Start ``work`` in a thread and return its job at once (``Busy`` if one is unfinished)."""
        with self._lock:
            running = next((j for j in self._jobs.values() if j.status in ("queued", "running")), None)
            if running is not None:
                raise Busy(running)
            job = Job(uuid.uuid4().hex[:16], kind, target, requested_by)
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
        threading.Thread(
            target=self._run, args=(job, work, on_done, on_failed), name=f"job-{job.id}", daemon=True
        ).start()
        return job

    def _run(self, job: Job, work, on_done, on_failed) -> None:
        job.status, job.started_at = "running", utc_now()
        try:
            result = work()
        except JobFailed as error:
            job.error = str(error)
        except Exception as error:  # a job's failure is reported to its caller, not raised
            logger.exception("job %s (%s %s) failed", job.id, job.kind, job.target)
            job.error = f"{type(error).__name__}: {error}"
        else:
            job.result = result
        callback = on_failed if job.error is not None else on_done
        try:
            if callback is not None:
                callback(job)
        except Exception as error:  # e.g. the audit log unwritable: the job must still end
            logger.exception("job %s: recording its outcome failed", job.id)
            job.error = (job.error + "; " if job.error else "") + f"recording the outcome failed: {error}"
        job.finished_at = utc_now()
        job.status = "failed" if job.error is not None else "done"
