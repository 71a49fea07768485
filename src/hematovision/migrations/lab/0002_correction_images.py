"""Corrected images in the database: ``correction_images`` (sha256, bytes, size, stored_at).

Lab mode keeps corrected images here, so the retraining run on any host exports what a replica on
another host received (``hematovision.image_store``). The embedded default (sqlite) keeps them in a
folder and leaves this table empty. Additive: a version still running ignores it.

Revision ID: lab0002
Revises: lab0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from hematovision.migrations import create_table_if_missing

revision = "lab0002"
down_revision = "lab0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_table_if_missing(
        "correction_images",
        sa.Column("sha256", sa.Text, primary_key=True),  # content-addressed: the bytes' sha256, hex
        sa.Column("data", sa.LargeBinary, nullable=False),  # bytea on PostgreSQL
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("stored_at", sa.Float, nullable=False),  # Unix time last stored: retention's clock
    )


def downgrade() -> None:
    op.drop_table("correction_images")
