"""Ledger: assets, accounts, transfers, journal entries, failures, batches, holds, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 64
APPEND_ONLY = (
    "ledger_batches",
    "ledger_assets",
    "ledger_account_events",
    "ledger_transfers",
    "ledger_entries",
    "ledger_failures",
)


def _flags() -> list[sa.Column[bool]]:
    return [
        sa.Column(name, sa.Boolean, nullable=False)
        for name in ("no_overdraft", "no_overcredit", "debit_frozen", "credit_frozen")
    ]


def _balances() -> list[sa.Column[int]]:
    return [
        sa.Column(name, sa.BigInteger, nullable=False)
        for name in (
            "debits_posted",
            "credits_posted",
            "debits_pending",
            "credits_pending",
            "version",
        )
    ]


def _owner() -> list[sa.Column[str]]:
    return [
        sa.Column(name, sa.String(NAME), nullable=False)
        for name in ("legal_entity", "owner_kind", "owner_id", "purpose")
    ]


def upgrade() -> None:
    op.create_table(
        "ledger_batches",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("ops", sa.Integer, nullable=False),
        sa.Column("committed_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_ledger_batches"),
        sa.UniqueConstraint("hash", name="uq_ledger_batches_hash"),
    )
    op.create_table(
        "ledger_assets",
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("scale", sa.SmallInteger, nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("code", name="pk_ledger_assets"),
    )
    op.create_table(
        "ledger_accounts",
        sa.Column("id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("natural_key", sa.String(5 * NAME + 8), nullable=False),
        sa.Column("asset", sa.String(32), nullable=False),
        *_owner(),
        *_flags(),
        *_balances(),
        sa.Column("created_seq", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_accounts"),
        sa.UniqueConstraint("natural_key", name="uq_ledger_accounts_natural_key"),
        sa.ForeignKeyConstraint(
            ["asset"], ["ledger_assets.code"], name="fk_ledger_accounts_asset_ledger_assets"
        ),
        sa.CheckConstraint(
            "debits_posted >= 0 AND credits_posted >= 0"
            " AND debits_pending >= 0 AND credits_pending >= 0",
            name=op.f("ck_ledger_accounts_balances_not_negative"),
        ),
        sa.CheckConstraint(
            "NOT no_overdraft OR debits_posted + debits_pending <= credits_posted",
            name=op.f("ck_ledger_accounts_no_overdraft"),
        ),
        sa.CheckConstraint(
            "NOT no_overcredit OR credits_posted + credits_pending <= debits_posted",
            name=op.f("ck_ledger_accounts_no_overcredit"),
        ),
    )
    op.create_index(
        "ix_ledger_accounts_legal_entity_owner_kind_owner_id",
        "ledger_accounts",
        ["legal_entity", "owner_kind", "owner_id"],
    )
    op.create_table(
        "ledger_account_events",
        sa.Column("id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("account_id", sa.BigInteger, nullable=False),
        sa.Column("asset", sa.String(32), nullable=False),
        *_owner(),
        *_flags(),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_account_events"),
    )
    op.create_index("ix_ledger_account_events_seq", "ledger_account_events", ["seq"])
    op.create_table(
        "ledger_transfers",
        sa.Column("id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("asset", sa.String(32), nullable=False),
        sa.Column("postings", sa.Text, nullable=False),
        sa.Column("pending_id", sa.BigInteger, nullable=True),
        sa.Column("timeout_s", sa.Integer, nullable=True),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_transfers"),
        sa.UniqueConstraint("client", "key", name="uq_ledger_transfers_client_key"),
        sa.UniqueConstraint("pending_id", name="uq_ledger_transfers_pending_id"),
    )
    op.create_index("ix_ledger_transfers_seq", "ledger_transfers", ["seq"])
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("transfer_id", sa.BigInteger, nullable=False),
        sa.Column("account_id", sa.BigInteger, nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("posted_delta", sa.BigInteger, nullable=False),
        sa.Column("pending_delta", sa.BigInteger, nullable=False),
        *_balances(),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_entries"),
    )
    op.create_index("ix_ledger_entries_seq", "ledger_entries", ["seq"])
    op.create_index("ix_ledger_entries_account_id_id", "ledger_entries", ["account_id", "id"])
    op.create_table(
        "ledger_failures",
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("field", sa.String(128), nullable=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("client", "key", name="pk_ledger_failures"),
    )
    op.create_index("ix_ledger_failures_seq", "ledger_failures", ["seq"])
    op.create_table(
        "ledger_open_holds",
        sa.Column("transfer_id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("transfer_id", name="pk_ledger_open_holds"),
    )
    op.create_index("ix_ledger_open_holds_expires_at_ms", "ledger_open_holds", ["expires_at_ms"])
    op.create_table(
        "ledger_outbox",
        sa.Column("id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("transfer_id", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_outbox"),
    )
    _append_only_triggers()


def _append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION cardcore_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'cardcore: % on % refused: the journal is append-only',
                    TG_OP, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
            END $$
            """
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION cardcore_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION cardcore_append_only()"
            )
        return
    for table in APPEND_ONLY:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'cardcore: {action} on {table} refused: "
                "the journal is append-only'); END"
            )


def downgrade() -> None:
    for table in (
        "ledger_outbox",
        "ledger_open_holds",
        "ledger_failures",
        "ledger_entries",
        "ledger_transfers",
        "ledger_account_events",
        "ledger_accounts",
        "ledger_assets",
        "ledger_batches",
    ):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS cardcore_append_only()")
