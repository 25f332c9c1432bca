"""The ``dils_`` tables as every storage had them before they were versioned (dils-search 3badb71).

Each table (and index) is created only where it is missing, so a storage written before versioning
(which may lack ``dils_studies`` or ``dils_trainings``, added later) comes out at this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())
    if "dils_nodes" not in have:
        op.create_table(
            "dils_nodes",
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("parent_key", sa.String(64), nullable=True),
            sa.Column("depth", sa.Integer, nullable=False),
            sa.Column("spec_json", sa.Text, nullable=False),
            sa.Column("step_json", sa.Text, nullable=True),
            sa.Column("recipe_json", sa.Text, nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("metrics_json", sa.Text, nullable=True),
            sa.Column("own_flops", sa.BigInteger, nullable=False),
            sa.Column("own_seconds", sa.Float, nullable=False),
            sa.Column("artifact_uri", sa.Text, nullable=True),
            sa.Column("sha256", sa.String(64), nullable=True),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
            sa.Column("lease_owner", sa.String(128), nullable=True),
            sa.Column("lease_until", sa.Float, nullable=True),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("error", sa.Text, nullable=True),
        )
        op.create_index("ix_dils_nodes_parent_key", "dils_nodes", ["parent_key"])
        op.create_index("ix_dils_nodes_status", "dils_nodes", ["status"])
    if "dils_studies" not in have:
        op.create_table(
            "dils_studies",
            sa.Column("name", sa.String(512), primary_key=True),
            sa.Column("config_json", sa.Text, nullable=False),
            sa.Column("final_json", sa.Text, nullable=True),
            sa.Column("updated_at", sa.Float, nullable=False),
        )
    if "dils_trainings" not in have:
        op.create_table(
            "dils_trainings",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("key", sa.String(64), nullable=False),
            sa.Column("owner", sa.String(128), nullable=False),
            sa.Column("started_at", sa.Float, nullable=False),
            sa.Column("finished_at", sa.Float, nullable=True),
            sa.Column("status", sa.String(16), nullable=False),
        )
        op.create_index("ix_dils_trainings_key", "dils_trainings", ["key"])


def downgrade() -> None:  # pragma: no cover - storages are never downgraded
    raise NotImplementedError("the dils_ tables are never downgraded")
