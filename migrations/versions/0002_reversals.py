"""Ledger: reversals and refunds name the transfer they give back (`target_id`).

A transfer is reversed at most once: a unique index on `target_id` over reverse rows.
The column joins the hashed journal record of a transfer (journal format 2).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ledger_transfers", sa.Column("target_id", sa.BigInteger, nullable=True))
    op.create_index("ix_ledger_transfers_target_id", "ledger_transfers", ["target_id"])
    op.create_index(
        "uq_ledger_transfers_reversed_once",
        "ledger_transfers",
        ["target_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'reverse'"),
        postgresql_where=sa.text("kind = 'reverse'"),
    )


def downgrade() -> None:
    op.drop_index("uq_ledger_transfers_reversed_once", "ledger_transfers")
    op.drop_index("ix_ledger_transfers_target_id", "ledger_transfers")
    op.drop_column("ledger_transfers", "target_id")
