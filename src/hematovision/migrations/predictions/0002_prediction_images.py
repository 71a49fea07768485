"""Kept request images in the database: ``prediction_images`` (sha256, bytes, size, stored_at).

Lab mode keeps the images of the prediction log here, so every replica on every host reads what
any of them kept (``hematovision.image_store``). The embedded default (sqlite) keeps them in a
folder and leaves this table empty. Additive: a version still running ignores it.

Revision ID: predictions0002
Revises: predictions0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from hematovision.migrations import create_table_if_missing

revision = "predictions0002"
down_revision = "predictions0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "prediction_images",
        sa.Column("sha256", sa.Text, primary_key=True),  # content-addressed: the bytes' sha256, hex
        sa.Column("data", sa.LargeBinary, nullable=False),  # bytea on PostgreSQL
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("stored_at", sa.Float, nullable=False),  # Unix time last stored: retention's clock
    )


def downgrade() -> None:
    op.drop_table("prediction_images")
