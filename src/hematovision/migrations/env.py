"""Alembic's environment for the stores' migrations: always run through :mod:`hematovision.migrations`,
which hands over a connection already inside a transaction (and, on PostgreSQL, holding the
migration lock) and the store's own version table."""

from alembic import context

context.configure(
    connection=context.config.attributes["connection"],
    version_table=context.config.attributes["version_table"],
    render_as_batch=True,  # sqlite alters a table by copying it; Alembic's batch mode does that
)
with context.begin_transaction():
    context.run_migrations()
