"""Schema migrations of the stores (Alembic), the same on sqlite and PostgreSQL.

Three independent histories, one per store, each with its own version table, because on sqlite
each store is its own file (and in lab mode all three share one PostgreSQL database):

============  =====================================================  ===============================
store         tables                                                 version table
============  =====================================================  ===============================
lab           users, sessions, api_tokens, login_failures,           hematovision_lab_version
              corrections, audit, correction_images
predictions   predictions, prediction_images                         hematovision_predictions_version
monitoring    windows, alerts, monitor_kv                            hematovision_monitoring_version
============  =====================================================  ===============================

Each history's first revision adopts a database made before Alembic (the ``CREATE TABLE IF NOT
EXISTS`` schemas of earlier versions) as well as an empty one, so an existing sqlite file is
upgraded in place. A store migrates its database on first use in a process
(``Database._ensure_schema``); ``hematovision db upgrade`` does it ahead of a deployment
(:func:`upgrade`). Migrating runs in one
transaction: sqlite's write lock, or on PostgreSQL an advisory lock, makes processes that start
together migrate one after the other.

A new revision: ``alembic -c <an ini naming script_location = src/hematovision/migrations and
version_locations = src/hematovision/migrations/<store>> revision -m "..."``, or copy the previous
revision file of that store and point ``down_revision`` at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import command, op
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

if TYPE_CHECKING:  # database.py imports this module to migrate the stores it opens
    from hematovision.database import Database

STORES = ("lab", "predictions", "monitoring")
_HERE = Path(__file__).resolve().parent
# Any fixed 64-bit number: the PostgreSQL advisory lock that serialises migrations.
_MIGRATION_LOCK = 0x68656D61746F7631  # "hematov1"


def version_table(store: str) -> str:
    return f"hematovision_{store}_version"


def _config(store: str) -> Config:
    if store not in STORES:
        raise ValueError(f"no store {store!r} (stores: {', '.join(STORES)})")
    config = Config()
    config.set_main_option("path_separator", "os")
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("version_locations", str(_HERE / store))
    config.attributes["version_table"] = version_table(store)
    return config


def head(store: str) -> str:
    """The revision this version of the code expects ``store`` at."""
    return ScriptDirectory.from_config(_config(store)).get_current_head()


def current(database: Database, store: str) -> str | None:
    """The revision ``store``'s tables in ``database`` are at (None: never migrated)."""
    with database.reading(migrated=False) as connection:
        return MigrationContext.configure(
            connection, opts={"version_table": version_table(store)}
        ).get_current_revision()


def upgrade(database: Database, store: str) -> tuple[str | None, str]:
    """Migrate ``store``'s tables in ``database`` to this version; returns (before, after)."""
    config = _config(store)
    with database.transaction(migrated=False) as connection:
        if not database.is_sqlite:
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        context = MigrationContext.configure(connection, opts={"version_table": version_table(store)})
        before = context.get_current_revision()
        if before != head(store):
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    return before, head(store)


# --- helpers for the revisions: adopting tables an earlier version made without Alembic ---------------
def _inspector() -> sa.Inspector:
    return sa.inspect(op.get_bind())


def has_table(name: str) -> bool:
    return _inspector().has_table(name)


def columns_of(table: str) -> set[str]:
    return {column["name"] for column in _inspector().get_columns(table)}


def create_table_if_missing(name: str, *columns: sa.Column, **options) -> bool:
    """Create the table unless an earlier version made it; returns whether it was created."""
    if has_table(name):
        return False
    op.create_table(name, *columns, **options)
    return True


def add_column_if_missing(table: str, column: sa.Column) -> None:
    if column.name not in columns_of(table):
        op.add_column(table, column)


def create_index_if_missing(name: str, table: str, columns: list[str]) -> None:
    if name not in {index["name"] for index in _inspector().get_indexes(table)}:
        op.create_index(name, table, columns)
