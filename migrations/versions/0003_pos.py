"""POS host: terminals (with their sealed master keys and open batch), cards, settlements.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 64


def upgrade() -> None:
    op.create_table(
        "pos_terminals",
        sa.Column("tid", sa.String(8), nullable=False),
        sa.Column("mid", sa.String(15), nullable=False),
        sa.Column("store", sa.String(NAME), nullable=False),
        sa.Column("legal_entity", sa.String(NAME), nullable=False),
        sa.Column("key_mode", sa.String(8), nullable=False),
        sa.Column("tmk_sealed", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("batch", sa.String(6), nullable=False),
        sa.Column("batch_cycle", sa.Integer, nullable=False),
        sa.Column("sales_account", sa.BigInteger, nullable=False),
        sa.Column("cash_account", sa.BigInteger, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tid", name="pk_pos_terminals"),
    )
    op.create_table(
        "cards",
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("pan_masked", sa.String(19), nullable=False),
        sa.Column("legal_entity", sa.String(NAME), nullable=False),
        sa.Column("account_id", sa.BigInteger, nullable=False),
        sa.Column("expires", sa.String(4), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("balance_max", sa.BigInteger, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("token", name="pk_cards"),
        sa.UniqueConstraint("account_id", name="uq_cards_account_id"),
    )
    op.create_table(
        "pos_settlements",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("tid", sa.String(8), nullable=False),
        sa.Column("batch_cycle", sa.Integer, nullable=False),
        sa.Column("batch", sa.String(6), nullable=False),
        *[
            sa.Column(
                f"{who}{side}_{what}",
                sa.BigInteger if what == "amount" else sa.Integer,
                nullable=False,
            )
            for who in ("", "terminal_")
            for side in ("debit", "credit")
            for what in ("amount", "count")
        ],
        sa.Column("balanced", sa.Boolean, nullable=False),
        sa.Column("settled_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_pos_settlements"),
    )
    op.create_index(
        "ix_pos_settlements_tid_batch_cycle_batch",
        "pos_settlements",
        ["tid", "batch_cycle", "batch"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_table("pos_settlements")
    op.drop_table("cards")
    op.drop_table("pos_terminals")
