"""The request an issuance key was given with: `coupon_batches.request_sha256`.

An issuance of coupon codes under an idempotency key (generate, import, issue to members, a
points reward, a rule's reward) answered a repeat of the key with the first batch when the
campaign matched, whatever the repeat asked: an import of other codes, or an issuance to
other members, under a key already used was answered "replayed" and never done. The batch
now keeps the SHA-256 of the request (`coupons.model.issue_digest`), and the same key with
another request is 409 `key_reused`.

Running code: the column is nullable and NULL means "not kept": a batch made before this
revision is compared by its campaign and source only. Code older than this revision writes
NULL and never reads it.

Timeouts: migrations/env.py sets them on PostgreSQL; adding a nullable column changes the
catalogue only.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("coupon_batches") as batch:
        batch.add_column(sa.Column("request_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("coupon_batches") as batch:
        batch.drop_column("request_sha256")
