"""The issue fee a batch card still owes: `cards.fee_due` (fen).

A batch of bearer or gift cards used to pay its issue fee for every card when it was
printed, booking cash the till never received for cards still in stock. A batch card now
owes its fee (`fee_due`) and pays it when it is handed out: activated, or sold (a gift
card). Cards already issued owe nothing (0): their batches paid at print.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cards") as batch:
        batch.add_column(sa.Column("fee_due", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("cards") as batch:
        batch.drop_column("fee_due")
