"""The prediction log, with ``seq``: the order rows were logged in, which the drift monitor's
checkpoints count (PostgreSQL has no ``rowid``).

Adopts a log made before Alembic: ``open_set_score`` added if missing, then the table rebuilt with
``seq`` = its old ``rowid``, so the monitor's checkpoints (rowids) keep their meaning.

Revision ID: predictions0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from hematovision.migrations import add_column_if_missing, columns_of, create_index_if_missing, has_table

revision = "predictions0001"
down_revision = None
branch_labels = ("predictions",)
depends_on = None

COLUMNS = (
    "id",
    "created_at",
    "model_version",
    "label",
    "confidence",
    "probabilities",
    "needs_review",
    "embedding",
    "embedding_dim",
    "image_stats",
    "latency_ms",
    "image_sha256",
    "open_set_score",
)


def create_predictions() -> None:
    op.create_table(
        "predictions",
        # sqlite only numbers rows by itself for exactly "INTEGER PRIMARY KEY" (64-bit there anyway)
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),  # uuid4 hex, the client's prediction_id
        sa.Column("created_at", sa.Text, nullable=False),  # UTC ISO 8601
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("probabilities", sa.Text, nullable=False),  # JSON {class: probability}
        sa.Column("needs_review", sa.Integer, nullable=False),  # 0/1
        sa.Column("embedding", sa.LargeBinary),  # float16 little-endian, embedding_dim values
        sa.Column("embedding_dim", sa.Integer),
        sa.Column("image_stats", sa.Text, nullable=False),  # JSON
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("image_sha256", sa.Text, nullable=False),
        sa.Column("open_set_score", sa.Float),
        sqlite_autoincrement=True,  # a seq is never reused: checkpoints only move forward
    )


def upgrade() -> None:
    if not has_table("predictions"):
        create_predictions()
    elif "seq" not in columns_of("predictions"):
        if op.get_bind().dialect.name != "sqlite":
            raise RuntimeError("a predictions table without seq outside sqlite: not made by HematoVision")
        add_column_if_missing("predictions", sa.Column("open_set_score", sa.Float))
        for index in ("predictions_created_at", "predictions_model_version"):
            op.execute(f"DROP INDEX IF EXISTS {index}")
        op.rename_table("predictions", "predictions_before_seq")
        create_predictions()
        names = ", ".join(COLUMNS)
        op.execute(f"INSERT INTO predictions (seq, {names}) SELECT rowid, {names} FROM predictions_before_seq")
        op.drop_table("predictions_before_seq")
    create_index_if_missing("predictions_created_at", "predictions", ["created_at"])
    create_index_if_missing("predictions_model_version", "predictions", ["model_version", "seq"])


def downgrade() -> None:
    op.drop_table("predictions")
