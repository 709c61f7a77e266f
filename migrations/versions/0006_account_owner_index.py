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


NAME = "ix_ledger_accounts_owner_kind_owner_id_asset"
TABLE = "ledger_accounts"
COLUMNS = ["owner_kind", "owner_id", "asset"]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(NAME, TABLE, COLUMNS)
        return
    # Built CONCURRENTLY: a grown accounts table keeps taking writes (the till) meanwhile.
    # A build that failed half way leaves an invalid index of that name: dropped first.
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {NAME}")
        op.create_index(NAME, TABLE, COLUMNS, postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index(NAME, TABLE)
