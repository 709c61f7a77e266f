"""The stored-value grant budget each POS top-up spent: `pos_grant_spends`.

A POS top-up's hold spends its store's stored-value grant. Until now the spend was never
given back: a hold reversed by its terminal, or lapsing unconfirmed, kept the budget used.
Each spend is now recorded by the top-up's key (its grant, amount and hold) and given back
once when the hold ends without its value staying on the card.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_CHARS_MAX = 128  # cardcore.limits.KEY_CHARS_MAX when this revision was written


def upgrade() -> None:
    op.create_table(
        "pos_grant_spends",
        sa.Column("key", sa.String(KEY_CHARS_MAX), primary_key=True),
        sa.Column("grant_id", sa.BigInteger, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("hold_id", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_pos_grant_spends_state", "pos_grant_spends", ["state"])


def downgrade() -> None:
    op.drop_index("ix_pos_grant_spends_state", "pos_grant_spends")
    op.drop_table("pos_grant_spends")
