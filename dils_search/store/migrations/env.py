"""Alembic's environment for the ``dils_`` tables: run on the connection ``store/migrate.py`` passes in,
with its own version table (Optuna's tables beside them keep theirs, ``alembic_version``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from dils_search.store.schema import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":  # one upgrade at a time; the others then find it done
        connection.execute(text("SELECT pg_advisory_xact_lock(4242024)"))
    context.run_migrations()
