"""Ledger accounts by owner across legal entities: an index on (owner_kind, owner_id, asset).

A points holder's lots and debt are read by owner (the card's value account id) and asset
at every earning, redemption and balance; the index on (legal_entity, owner_kind,
owner_id) cannot serve a lookup without the entity, so it scanned the whole table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_ledger_accounts_owner_kind_owner_id_asset",
        "ledger_accounts",
        ["owner_kind", "owner_id", "asset"],
    )


def downgrade() -> None:
    op.drop_index("ix_ledger_accounts_owner_kind_owner_id_asset", "ledger_accounts")
