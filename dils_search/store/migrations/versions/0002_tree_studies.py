"""A study row may describe a GrowthTree instead of a TOML config: ``dils_studies.tree_json`` (new) and
``config_json`` (now nullable). Nothing stored changes; only rows written from now on may use it."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dils_studies") as batch:  # SQLite alters a column by copying the table
        batch.add_column(sa.Column("tree_json", sa.Text, nullable=True))
        batch.alter_column("config_json", existing_type=sa.Text, nullable=True)


def downgrade() -> None:  # pragma: no cover - storages are never downgraded
    raise NotImplementedError("the dils_ tables are never downgraded")
