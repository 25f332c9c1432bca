"""Alembic migrations of the ``dils_`` tables (run by ``store/migrate.py``; version table ``dils_alembic_version``)."""
