"""The key-encrypting key's check value: `vault_keys`, one row per key the database knows.

A server started with another KEK than the one the database's card numbers, terminal keys
and member documents were sealed with found no card at the POS, counted every PIN wrong,
and sealed what it made next with the wrong key: two keys in one database. The first start
with a KEK records its check value here (an HKDF derivation of the key, never the key);
every later start compares and refuses another key.

Running code: code older than this revision never reads the table. A database upgraded
from an earlier revision has no row: its next start tries the KEK it is given on what the
database sealed (a terminal's master key, else a card number) and records it only if it
opens it (`migrate.check_kek`).

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "vault_keys",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("check_value", sa.String(32), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vault_keys")
