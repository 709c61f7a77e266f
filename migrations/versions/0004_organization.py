"""Organization (legal entities, stores, staff, tokens, grants, audit log), members, card
classes, and the card columns of issue 4 (number ciphertext, class, member, store, PIN
verification value). A replaced card shares its account with its successor, so the account
id of a card is no longer unique.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 64
CODE = 32
APPEND_ONLY = ("org_audit_log", "member_consents")
NUMBERING_ROWS = 1000  # cards numbered per statement (by primary key: linear in the cards)


def _index(table: str, *columns: str) -> None:
    op.create_index(f"ix_{table}_{'_'.join(columns)}", table, list(columns))


def upgrade() -> None:
    _organization()
    _members()
    _card_classes()
    _cards()
    _append_only_triggers()


def _organization() -> None:
    op.create_table(
        "org_legal_entities",
        sa.Column("id", sa.String(CODE), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_org_legal_entities"),
    )
    op.create_table(
        "org_stores",
        sa.Column("id", sa.String(CODE), nullable=False),
        sa.Column("legal_entity", sa.String(CODE), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("region", sa.String(NAME), nullable=False),
        sa.Column("city", sa.String(NAME), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_org_stores"),
    )
    _index("org_stores", "legal_entity")
    op.create_table(
        "org_staff_users",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(CODE), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("scope_kind", sa.String(16), nullable=False),
        sa.Column("scope_id", sa.String(CODE), nullable=False),
        sa.Column("scope_entity", sa.String(CODE), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_org_staff_users"),
        sa.UniqueConstraint("name", name="uq_org_staff_users_name"),
    )
    op.create_table(
        "org_api_tokens",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("label", sa.String(NAME), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_org_api_tokens"),
        sa.UniqueConstraint("secret_hash", name="uq_org_api_tokens_secret_hash"),
    )
    _index("org_api_tokens", "user_id")
    op.create_table(
        "org_grants",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("store", sa.String(CODE), nullable=False),
        sa.Column("function", sa.String(16), nullable=False),
        sa.Column("product", sa.String(CODE), nullable=False),
        sa.Column("budget_count", sa.BigInteger, nullable=True),
        sa.Column("budget_amount", sa.BigInteger, nullable=True),
        sa.Column("used_count", sa.BigInteger, nullable=False),
        sa.Column("used_amount", sa.BigInteger, nullable=False),
        sa.Column("valid_from", sa.String(10), nullable=False),
        sa.Column("valid_to", sa.String(10), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_org_grants"),
    )
    _index("org_grants", "store")
    op.create_table(
        "org_audit_log",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("user", sa.String(CODE), nullable=False),
        sa.Column("token_id", sa.Integer, nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("action", sa.String(NAME), nullable=False),
        sa.Column("object_kind", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(NAME), nullable=False),
        sa.Column("entity", sa.String(CODE), nullable=False),
        sa.Column("store", sa.String(CODE), nullable=False),
        sa.Column("before", sa.Text, nullable=True),
        sa.Column("after", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_org_audit_log"),
    )
    _index("org_audit_log", "object_kind", "object_id")
    _index("org_audit_log", "entity", "store")


def _members() -> None:
    op.create_table(
        "members",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("mobile", sa.String(20), nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("gender", sa.String(1), nullable=False),
        sa.Column("birthday", sa.String(10), nullable=False),
        sa.Column("id_type", sa.String(16), nullable=False),
        sa.Column("id_hash", sa.String(64), nullable=True),
        sa.Column("id_sealed", sa.String(256), nullable=False),
        sa.Column("id_masked", sa.String(32), nullable=False),
        sa.Column("email", sa.String(128), nullable=False),
        sa.Column("sms_alerts", sa.Boolean, nullable=False),
        sa.Column("sms_marketing", sa.Boolean, nullable=False),
        sa.Column("tier", sa.String(CODE), nullable=False),
        sa.Column("home_store", sa.String(CODE), nullable=False),
        sa.Column("legal_entity", sa.String(CODE), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("merged_into", sa.Integer, nullable=True),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_members"),
        sa.UniqueConstraint("mobile", name="uq_members_mobile"),
    )
    _index("members", "id_hash")
    _index("members", "home_store")
    op.create_table(
        "member_consents",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("member_id", sa.Integer, nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("granted", sa.Boolean, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_member_consents"),
    )
    _index("member_consents", "member_id")


def _card_classes() -> None:
    op.create_table(
        "card_classes",
        sa.Column("code", sa.String(CODE), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("named", sa.Boolean, nullable=False),
        sa.Column("gift", sa.Boolean, nullable=False),
        sa.Column("denominations", sa.String(256), nullable=False),
        sa.Column("discount_bp", sa.Integer, nullable=False),
        sa.Column("points_multiplier_pct", sa.Integer, nullable=False),
        sa.Column("issue_fee", sa.BigInteger, nullable=False),
        sa.Column("replace_fee", sa.BigInteger, nullable=False),
        sa.Column("balance_max", sa.BigInteger, nullable=False),
        sa.Column("validity_months", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("code", name="pk_card_classes"),
    )


def _cards() -> None:
    """Cards issued before 0004 keep working: ids are numbered in issue order, they belong to
    no class and no member, and their number ciphertext is empty (it was never kept)."""
    with op.batch_alter_table("cards") as batch:
        batch.drop_constraint("uq_cards_account_id", type_="unique")
        batch.add_column(sa.Column("id", sa.BigInteger, nullable=True))
        for name, size in (("pan_sealed", 128), ("secret_sealed", 128), ("pvv", 64)):
            batch.add_column(sa.Column(name, sa.String(size), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("class_code", sa.String(CODE), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("member_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("store", sa.String(NAME), nullable=False, server_default=""))
        batch.add_column(sa.Column("named", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("pin_failures", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("replaced_by", sa.BigInteger, nullable=True))
        batch.add_column(
            sa.Column("updated_at_ms", sa.BigInteger, nullable=False, server_default="0")
        )
    bind = op.get_bind()
    tokens = [
        row[0]
        for row in bind.execute(sa.text("SELECT token FROM cards ORDER BY created_at_ms, token"))
    ]
    number = sa.text("UPDATE cards SET id = :id, updated_at_ms = created_at_ms WHERE token = :t")
    for start in range(0, len(tokens), NUMBERING_ROWS):
        chunk = tokens[start : start + NUMBERING_ROWS]
        bind.execute(number, [{"id": start + i + 1, "t": t} for i, t in enumerate(chunk)])
    with op.batch_alter_table("cards") as batch:
        batch.alter_column("id", existing_type=sa.BigInteger, nullable=False)
        batch.create_unique_constraint("uq_cards_id", ["id"])
        for name in ("pan_sealed", "secret_sealed", "pvv", "class_code", "store", "named"):
            batch.alter_column(name, server_default=None)
        for name in ("pin_failures", "updated_at_ms"):
            batch.alter_column(name, server_default=None)
    op.create_index("ix_cards_account_id", "cards", ["account_id"])
    op.create_index("ix_cards_class_code", "cards", ["class_code"])
    op.create_index("ix_cards_member_id", "cards", ["member_id"])
    op.create_index("ix_cards_store", "cards", ["store"])


def _append_only_triggers() -> None:
    """The PostgreSQL function cardcore_append_only() comes from 0001."""
    if op.get_bind().dialect.name == "postgresql":
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
                "the log is append-only'); END"
            )


def downgrade() -> None:
    shared = (
        op.get_bind()
        .execute(
            sa.text("SELECT account_id FROM cards GROUP BY account_id HAVING count(*) > 1 LIMIT 1")
        )
        .first()
    )
    if shared is not None:
        raise RuntimeError(
            "cannot downgrade below 0004: replaced cards share value accounts "
            f"(account {shared[0]}); 0003 allows one card per account"
        )
    for name in ("ix_cards_store", "ix_cards_member_id", "ix_cards_class_code"):
        op.drop_index(name, table_name="cards")
    op.drop_index("ix_cards_account_id", table_name="cards")
    with op.batch_alter_table("cards") as batch:
        batch.drop_constraint("uq_cards_id", type_="unique")
        for name in (
            "updated_at_ms",
            "replaced_by",
            "pin_failures",
            "named",
            "store",
            "member_id",
            "class_code",
            "pvv",
            "secret_sealed",
            "pan_sealed",
            "id",
        ):
            batch.drop_column(name)
        batch.create_unique_constraint("uq_cards_account_id", ["account_id"])
    for table in (
        "card_classes",
        "member_consents",
        "members",
        "org_audit_log",
        "org_grants",
        "org_api_tokens",
        "org_staff_users",
        "org_stores",
        "org_legal_entities",
    ):
        op.drop_table(table)
