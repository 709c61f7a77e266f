"""The fee of a new card, recorded until the card is written: `card_fee_intents`.

A new card's issue fee is taken before the card is written (so an error never leaves a
written card whose number nobody was told), under a key drawn at random, as the card has no
identity yet. A server that stopped between the two, or a request cancelled there, left the
fee taken and no card, and a retry took a second fee. Each such fee is now recorded first
and the record deleted in the card's own transaction; the server's sweep gives back a fee
whose record is older than `CARD_FEE_INTENT_STALE_S` (cardcore/cards/service.py
`sweep_fee_intents`).

Running code: a new table, which code older than this does not know (its fees stay as they
were, unrecorded). Timeouts: migrations/env.py sets them on PostgreSQL; creating an empty
table takes no lock on another.

Downgrade: drops the table (fees recorded and not yet swept stay taken).

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "card_fee_intents",
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("store", sa.String(64), nullable=False),
        sa.Column("operator", sa.String(32), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_card_fee_intents_created_at_ms", "card_fee_intents", ["created_at_ms"])


def downgrade() -> None:
    op.drop_table("card_fee_intents")
