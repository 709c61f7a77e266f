"""The functions POS transaction keys were claimed for: `pos_claims` (key, function).

A terminal's key (terminal, batch cycle, batch, STAN) is one transaction whatever function it
is sent with. The ledger keeps money requests under it; feature requests (coupons, service
and manager cards, points) kept it only in their own tables, so a second request of another
function under one key was applied too, and one 0400 then undid both. Each feature request
now claims its key here first, and a request of another function under a claimed key, or a
feature request under a key the ledger holds, is answered 94.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_CHARS_MAX = 128  # cardcore.limits.KEY_CHARS_MAX when this revision was written


def upgrade() -> None:
    op.create_table(
        "pos_claims",
        sa.Column("key", sa.String(KEY_CHARS_MAX), primary_key=True),
        sa.Column("function", sa.String(16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pos_claims")
