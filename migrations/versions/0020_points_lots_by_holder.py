"""Ledger accounts by asset and owner in id order: an index on (asset, owner_kind, owner_id, id).

The points expiry job reads a program's lot accounts a page at a time, one holder's lots
together (ordered by owner id, then account id), so that it writes one notice per holder
and expiry day however many lots and pages that day has. With this index each page is one
range read from its cursor; the index on (owner_kind, owner_id, asset) gives neither the
asset first nor the id order.

Running code: code older than this revision never asks for this order; the index only
makes its reads cheaper.

Revision ID: 0020
Revises: 0019
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cardcore import limits

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


NAME = "ix_ledger_accounts_asset_owner_kind_owner_id_id"
TABLE = "ledger_accounts"
COLUMNS = ["asset", "owner_kind", "owner_id", "id"]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(NAME, TABLE, COLUMNS)
        return
    # Built CONCURRENTLY: a grown accounts table keeps taking writes (the till) meanwhile.
    # A build that failed half way leaves an invalid index of that name: dropped first. The
    # build has its own timeouts, as 0013's (a table of millions of lots takes longer than a
    # statement may), the migration's again after.
    bind = op.get_bind()
    with op.get_context().autocommit_block():
        bound = limits.DB_INDEX_BUILD_TIMEOUT_MS
        bind.execute(sa.text(f"SET lock_timeout = {bound}"))
        bind.execute(sa.text(f"SET statement_timeout = {bound}"))
        try:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {NAME}")
            op.create_index(NAME, TABLE, COLUMNS, postgresql_concurrently=True)
        finally:
            bind.execute(sa.text(f"SET lock_timeout = {limits.DB_LOCK_TIMEOUT_MS}"))
            bind.execute(sa.text(f"SET statement_timeout = {limits.DB_STATEMENT_TIMEOUT_MS}"))


def downgrade() -> None:
    op.drop_index(NAME, TABLE)
