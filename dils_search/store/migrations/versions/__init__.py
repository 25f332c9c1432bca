"""One module per revision of the ``dils_`` tables, in ``store/schema.py``'s ``SCHEMA_VERSIONS`` order."""
