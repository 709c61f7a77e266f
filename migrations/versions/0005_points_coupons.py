"""Issue 5: points (programs, rules, earnings pinned before they post, clawbacks, transfers,
tiers), e-coupons (campaigns, codes, redemptions, batches, signing keys), service cards,
manager cards, the members' notice outbox, and the points program of a card class.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _points()
    _coupons()
    _coupon_enrolments()
    _service_cards()
    _manager_cards()
    _notices()


def _points() -> None:
    op.create_table(
        "points_clawbacks",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("earning", sa.String(length=160), nullable=False),
        sa.Column("returned", sa.BigInteger(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("debt", sa.BigInteger(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_points_clawbacks")),
    )
    op.create_index(
        op.f("ix_points_clawbacks_earning"), "points_clawbacks", ["earning"], unique=False
    )
    op.create_table(
        "points_earning_parts",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("rule", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.BigInteger(), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", "rule", name=op.f("pk_points_earning_parts")),
    )
    op.create_index(
        op.f("ix_points_earning_parts_holder_rule_day"),
        "points_earning_parts",
        ["holder", "rule", "day"],
        unique=False,
    )
    op.create_table(
        "points_earnings",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("holder", sa.BigInteger(), nullable=False),
        sa.Column("program", sa.String(length=32), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("debt_repaid", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("returned", sa.BigInteger(), nullable=False),
        sa.Column("clawed", sa.BigInteger(), nullable=False),
        sa.Column("lot", sa.String(length=64), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=160), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_points_earnings")),
    )
    op.create_index(
        op.f("ix_points_earnings_holder_day"), "points_earnings", ["holder", "day"], unique=False
    )
    op.create_index(op.f("ix_points_earnings_source"), "points_earnings", ["source"], unique=False)
    op.create_table(
        "points_holders",
        sa.Column("holder", sa.BigInteger(), nullable=False),
        sa.Column("program", sa.String(length=32), nullable=False),
        sa.Column("tier", sa.String(length=32), nullable=False),
        sa.Column("tier_since_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("holder", "program", name=op.f("pk_points_holders")),
    )
    op.create_table(
        "points_programs",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("asset", sa.String(length=32), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_points_programs")),
        sa.UniqueConstraint("asset", name=op.f("uq_points_programs_asset")),
    )
    op.create_table(
        "points_rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("program", sa.String(length=32), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("legal_entity", sa.String(length=32), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_points_rules")),
        sa.UniqueConstraint("program", "code", name=op.f("uq_points_rules_program_code")),
    )
    op.create_table(
        "points_transfers",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("program", sa.String(length=32), nullable=False),
        sa.Column("from_holder", sa.BigInteger(), nullable=False),
        sa.Column("to_holder", sa.BigInteger(), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_points_transfers")),
    )
    op.create_index(
        op.f("ix_points_transfers_from_holder_day"),
        "points_transfers",
        ["from_holder", "day"],
        unique=False,
    )
    op.add_column(
        "card_classes",
        sa.Column("points_program", sa.String(length=32), server_default="", nullable=False),
    )


def _coupons() -> None:
    op.create_table(
        "coupon_batches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("campaign", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("done", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.String(length=160), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_coupon_batches")),
        sa.UniqueConstraint("key", name=op.f("uq_coupon_batches_key")),
    )
    op.create_index(
        op.f("ix_coupon_batches_campaign"), "coupon_batches", ["campaign"], unique=False
    )
    op.create_table(
        "coupon_campaigns",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("legal_entity", sa.String(length=32), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("issued_count", sa.BigInteger(), nullable=False),
        sa.Column("issued_value", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_count", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_value", sa.BigInteger(), nullable=False),
        sa.Column("store_cost", sa.BigInteger(), nullable=False),
        sa.Column("supplier_cost", sa.BigInteger(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_coupon_campaigns")),
    )
    op.create_table(
        "coupon_codes",
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("campaign", sa.String(length=32), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=True),
        sa.Column("batch", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("valid_from_ms", sa.BigInteger(), nullable=False),
        sa.Column("valid_to_ms", sa.BigInteger(), nullable=False),
        sa.Column("reserved_key", sa.String(length=160), nullable=True),
        sa.Column("reserved_until_ms", sa.BigInteger(), nullable=True),
        sa.Column("redeemed_key", sa.String(length=160), nullable=True),
        sa.Column("redeemed_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("issued_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_coupon_codes")),
    )
    op.create_index(op.f("ix_coupon_codes_batch"), "coupon_codes", ["batch"], unique=False)
    op.create_index(
        op.f("ix_coupon_codes_campaign_state"), "coupon_codes", ["campaign", "state"], unique=False
    )
    op.create_index(op.f("ix_coupon_codes_member_id"), "coupon_codes", ["member_id"], unique=False)
    op.create_table(
        "coupon_redemptions",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("campaign", sa.String(length=32), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=True),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("terminal", sa.String(length=8), nullable=False),
        sa.Column("sale", sa.String(length=24), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("bill_fen", sa.BigInteger(), nullable=False),
        sa.Column("discount_fen", sa.BigInteger(), nullable=False),
        sa.Column("forfeited_fen", sa.BigInteger(), nullable=False),
        sa.Column("store_cost_fen", sa.BigInteger(), nullable=False),
        sa.Column("supplier_cost_fen", sa.BigInteger(), nullable=False),
        sa.Column("supplier_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_coupon_redemptions")),
    )
    op.create_index(
        op.f("ix_coupon_redemptions_campaign_member_id_day"),
        "coupon_redemptions",
        ["campaign", "member_id", "day"],
        unique=False,
    )
    op.create_index(
        op.f("ix_coupon_redemptions_code"), "coupon_redemptions", ["code"], unique=False
    )
    op.create_index(
        op.f("ix_coupon_redemptions_terminal_sale"),
        "coupon_redemptions",
        ["terminal", "sale"],
        unique=False,
    )
    op.create_table(
        "coupon_signing_keys",
        sa.Column("kid", sa.String(length=32), nullable=False),
        sa.Column("legal_entity", sa.String(length=32), nullable=False),
        sa.Column("public_hex", sa.String(length=64), nullable=False),
        sa.Column("private_sealed", sa.String(length=256), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_coupon_signing_keys")),
    )
    op.create_index(
        op.f("ix_coupon_signing_keys_legal_entity"),
        "coupon_signing_keys",
        ["legal_entity"],
        unique=False,
    )


def _coupon_enrolments() -> None:
    op.create_table(
        "coupon_enrolments",
        sa.Column("campaign", sa.String(length=32), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=False),
        sa.Column("enrolled_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("campaign", "member_id", name=op.f("pk_coupon_enrolments")),
    )


def _service_cards() -> None:
    op.create_table(
        "service_entitlements",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("product", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.BigInteger(), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=True),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("uses_total", sa.Integer(), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("price_fen", sa.BigInteger(), nullable=False),
        sa.Column("sold_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("sale_key", sa.String(length=160), nullable=False),
        sa.Column("refund_key", sa.String(length=160), nullable=True),
        sa.Column("refunded_fen", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_entitlements")),
        sa.UniqueConstraint("sale_key", name=op.f("uq_service_entitlements_sale_key")),
    )
    op.create_index(
        op.f("ix_service_entitlements_holder"), "service_entitlements", ["holder"], unique=False
    )
    op.create_table(
        "service_products",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("legal_entity", sa.String(length=32), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_service_products")),
    )
    op.create_table(
        "service_redemptions",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("entitlement", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("uses_left_after", sa.Integer(), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("terminal", sa.String(length=8), nullable=False),
        sa.Column("reversed", sa.Boolean(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_service_redemptions")),
    )
    op.create_index(
        op.f("ix_service_redemptions_entitlement"),
        "service_redemptions",
        ["entitlement"],
        unique=False,
    )


def _manager_cards() -> None:
    op.create_table(
        "manager_authorizations",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("card", sa.Integer(), nullable=False),
        sa.Column("staff_user_id", sa.Integer(), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("terminal", sa.String(length=8), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("bill_fen", sa.BigInteger(), nullable=False),
        sa.Column("discount_fen", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("reversed", sa.Boolean(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_manager_authorizations")),
    )
    op.create_index(
        op.f("ix_manager_authorizations_card_day"),
        "manager_authorizations",
        ["card", "day"],
        unique=False,
    )
    op.create_table(
        "manager_cards",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("pan_masked", sa.String(length=19), nullable=False),
        sa.Column("pan_sealed", sa.String(length=128), nullable=False),
        sa.Column("staff_user_id", sa.Integer(), nullable=False),
        sa.Column("store", sa.String(length=32), nullable=False),
        sa.Column("legal_entity", sa.String(length=32), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("pvv", sa.String(length=64), nullable=False),
        sa.Column("pin_failures", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_manager_cards")),
        sa.UniqueConstraint("token", name=op.f("uq_manager_cards_token")),
    )
    op.create_index(
        op.f("ix_manager_cards_staff_user_id"), "manager_cards", ["staff_user_id"], unique=False
    )


def _notices() -> None:
    op.create_table(
        "member_notices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("member_id", sa.Integer(), nullable=True),
        sa.Column("holder", sa.BigInteger(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("sent_at_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_member_notices")),
        sa.UniqueConstraint("key", name=op.f("uq_member_notices_key")),
    )
    op.create_index(
        op.f("ix_member_notices_member_id"), "member_notices", ["member_id"], unique=False
    )
    op.create_index(
        op.f("ix_member_notices_sent_at_ms"), "member_notices", ["sent_at_ms"], unique=False
    )


def downgrade() -> None:
    with op.batch_alter_table("card_classes") as batch:
        batch.drop_column("points_program")
    for table in TABLES:
        op.drop_table(table)


TABLES = (
    "coupon_enrolments",
    "coupon_batches",
    "coupon_campaigns",
    "coupon_codes",
    "coupon_redemptions",
    "coupon_signing_keys",
    "manager_authorizations",
    "manager_cards",
    "member_notices",
    "points_clawbacks",
    "points_earning_parts",
    "points_earnings",
    "points_holders",
    "points_programs",
    "points_rules",
    "points_transfers",
    "service_entitlements",
    "service_products",
    "service_redemptions",
)
