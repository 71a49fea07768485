"""The drift monitor's state: windows judged, alerts raised, checkpoints (adopts a database made
before Alembic as it is).

Revision ID: monitoring0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from hematovision.migrations import create_table_if_missing

revision = "monitoring0001"
down_revision = None
branch_labels = ("monitoring",)
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "windows",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("checked_at", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("mode", sa.Text, nullable=False),  # count | time
        sa.Column("first_rowid", sa.BigInteger, nullable=False),  # the prediction log's seq
        sa.Column("last_rowid", sa.BigInteger, nullable=False),
        sa.Column("start_at", sa.Text, nullable=False),
        sa.Column("end_at", sa.Text, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("drifting", sa.Integer, nullable=False),
        sa.Column("signals", sa.Text, nullable=False),  # JSON
        sa.Column("report", sa.Text),  # file name under monitoring.reports_dir
        sqlite_autoincrement=True,
    )
    create_table_if_missing(
        "alerts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("decided_by", sa.Text),
        sa.Column("decided_at", sa.Text),
        sa.Column("webhook", sa.Text),
        sqlite_autoincrement=True,
    )
    create_table_if_missing(
        "monitor_kv",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),  # JSON
    )


def downgrade() -> None:
    for table in ("monitor_kv", "alerts", "windows"):
        op.drop_table(table)
