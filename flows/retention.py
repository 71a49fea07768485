"""The retention-purge flow: one retention pass (``hematovision.serving.retention.retention_pass``,
the same pass every serving worker runs on its timer and ``hematovision predictions purge`` runs by
hand), as a flow that lab mode schedules on a worker (``deploy.purge_cron``).

    uv run python -m flows.retention
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from hematovision.serving.retention import retention_pass
from hematovision.settings import get_settings


@flow(name="hematovision-retention", log_prints=True)
def retention_flow(older_than_days: float | None = None) -> dict[str, int]:
    """Delete what every retention setting says is due (images, embeddings, corrections if set, the
    embedding cache if set); returns the counts per kind."""
    counts = retention_pass(get_settings(), older_than_days)
    get_run_logger().info("retention pass: %s", counts)
    return counts


if __name__ == "__main__":
    retention_flow()
