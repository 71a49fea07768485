"""The lab database: accounts, sessions, API tokens, failed sign-ins, corrections and the audit log.

Adopts a database made before Alembic: tables kept, columns added since the first schema added
(sessions idling out, tokens expiring), tokens made before tokens expired given an expiry.

Revision ID: lab0001
Revises:
Create Date: 2026-11-29
"""

from datetime import datetime, timedelta

import sqlalchemy as sa
from alembic import op

from hematovision.migrations import add_column_if_missing, create_index_if_missing, create_table_if_missing

revision = "lab0001"
down_revision = None
branch_labels = ("lab",)
depends_on = None

TOKEN_DAYS_BEFORE_EXPIRY = 90  # the lifetime given to tokens made before tokens expired


def upgrade() -> None:
    create_table_if_missing(
        "users",
        sa.Column("username", sa.Text, primary_key=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("roles", sa.Text, nullable=False),  # comma-separated
        sa.Column("disabled", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Text, nullable=False),
    )
    create_table_if_missing(
        "sessions",
        sa.Column("id_sha256", sa.Text, primary_key=True),
        sa.Column("username", sa.Text, sa.ForeignKey("users.username"), nullable=False),
        sa.Column("csrf_token", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Text, nullable=False),
        sa.Column("last_seen_at", sa.Text),
    )
    create_table_if_missing(
        "api_tokens",
        sa.Column("token_sha256", sa.Text, primary_key=True),
        sa.Column("username", sa.Text, sa.ForeignKey("users.username"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Text),
        sa.Column("last_used_at", sa.Text),
    )
    create_table_if_missing(
        "login_failures",
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),  # Unix time: shared by processes and machines
    )
    create_index_if_missing("login_failures_key", "login_failures", ["username", "address", "at"])
    create_index_if_missing("login_failures_at", "login_failures", ["at"])
    create_table_if_missing(
        "corrections",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.Text, nullable=False),
        sa.Column("true_class", sa.Text, nullable=False),
        sa.Column("predicted_class", sa.Text),
        sa.Column("model_version", sa.Text),
        sa.Column("prediction_id", sa.Text),
        sa.Column("comment", sa.Text, nullable=False, server_default=""),
    )
    create_index_if_missing("corrections_image", "corrections", ["image_sha256"])
    create_index_if_missing("corrections_prediction", "corrections", ["prediction_id"])
    create_table_if_missing(
        "audit",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False, server_default=""),
        sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
        sqlite_autoincrement=True,  # an audit sequence number is never reused
    )

    # Databases made before sessions idled out and tokens expired.
    add_column_if_missing("sessions", sa.Column("last_seen_at", sa.Text))
    add_column_if_missing("api_tokens", sa.Column("expires_at", sa.Text))
    add_column_if_missing("api_tokens", sa.Column("last_used_at", sa.Text))
    bind = op.get_bind()
    unexpiring = bind.execute(sa.text("SELECT token_sha256, created_at FROM api_tokens WHERE expires_at IS NULL"))
    for token, created in unexpiring.all():
        expires = datetime.fromisoformat(created) + timedelta(days=TOKEN_DAYS_BEFORE_EXPIRY)
        bind.execute(
            sa.text("UPDATE api_tokens SET expires_at = :expires WHERE token_sha256 = :token"),
            {"expires": expires.isoformat(timespec="microseconds"), "token": token},
        )


def downgrade() -> None:
    for table in ("audit", "corrections", "login_failures", "api_tokens", "sessions", "users"):
        op.drop_table(table)
