"""A service package's refund terms may be unrecorded: the four columns 0007 added to
`service_entitlements` (`refund_policy`, `refund_fee_fen`, `single_use_price_fen`,
`refund_after_expiry`) lose NOT NULL.

0007 first added them NOT NULL (with the defaults `none`, 0, 0, false, no refund, until
filled), which broke the code still running during a rolling upgrade: code older than 0007
sells packages without the columns, and after 0007 such a sale failed (its money undone,
`service_sale_undone`), while one during 0007's fill could get no refund, whatever its
product said. NULL now means "not recorded": the package is refunded by its product's terms
as they are at the refund (what code older than 0007 read), so an older sale is accepted and
refunds as its product does; its product gone (none ever is), it gets no refund, 0007's
rule. Such code writes none of the four, so they are NULL together; the service reads all
four from the product when any is NULL. Code that sells writes all four at every sale, as
before. 0007 now adds the columns nullable; on a database where it ran the first way, this
drops NOT NULL, so both end the same.

Code of the releases from 0007 to 0011 (before this) cannot read a NULL: a database
left there with packages sold meanwhile by code older than 0007 needs this revision
before that code serves again.

Downgrade: the packages with a term NULL get their product's four terms as they are, else
no refund (as 0007 fills), in batches by id; then the columns are NOT NULL again.

Timeouts: migrations/env.py sets the lock and statement timeouts of every migration on
PostgreSQL; dropping NOT NULL changes the catalogue only (no table scan; setting it again, in
the downgrade, scans the table).

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "service_entitlements"
CODE = 32
BACKFILL_ROWS = 10_000  # packages filled per statement (by primary key range)
COLUMNS = (
    ("refund_policy", sa.String(CODE)),
    ("refund_fee_fen", sa.BigInteger()),
    ("single_use_price_fen", sa.BigInteger()),
    ("refund_after_expiry", sa.Boolean()),
)


def _unrecorded(alias: str = "") -> str:
    """Whether a package did not record its terms: any of the four NULL (older code writes
    none of them), as SQL on the table named `alias` ("e." or none)."""
    return "(" + " OR ".join(f"{alias}{name} IS NULL" for name, _ in COLUMNS) + ")"


# The product's terms, from its definition (JSON text), for the packages that recorded
# none (0007's fill, NULLs only): one statement per dialect.
FILL_POSTGRESQL = f"""
UPDATE service_entitlements AS e SET
    refund_policy = p.definition::jsonb ->> 'refund_policy',
    refund_fee_fen = (p.definition::jsonb ->> 'refund_fee_fen')::bigint,
    single_use_price_fen = (p.definition::jsonb ->> 'single_use_price_fen')::bigint,
    refund_after_expiry = (p.definition::jsonb ->> 'refund_after_expiry')::boolean
FROM service_products AS p
WHERE p.code = e.product AND e.id >= :low AND e.id < :high AND {_unrecorded("e.")}
"""  # noqa: S608 - fixed text, the bounds are parameters
_TERM = "(SELECT json_extract(p.definition, '$.{}') FROM service_products AS p "
_TERM += "WHERE p.code = service_entitlements.product)"
FILL_SQLITE = f"""
UPDATE service_entitlements SET
    refund_policy = {_TERM.format("refund_policy")},
    refund_fee_fen = {_TERM.format("refund_fee_fen")},
    single_use_price_fen = {_TERM.format("single_use_price_fen")},
    refund_after_expiry = {_TERM.format("refund_after_expiry")}
WHERE id >= :low AND id < :high AND {_unrecorded()}
  AND product IN (SELECT code FROM service_products)
"""  # noqa: S608 - fixed text, the bounds are parameters
# No refund for a package whose product is gone (0007's rule): both dialects.
FILL_GONE = f"""
UPDATE service_entitlements SET
    refund_policy = 'none', refund_fee_fen = 0, single_use_price_fen = 0,
    refund_after_expiry = FALSE
WHERE id >= :low AND id < :high AND {_unrecorded()}
  AND product NOT IN (SELECT code FROM service_products)
"""  # noqa: S608 - fixed text, the bounds are parameters


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        for name, type_ in COLUMNS:
            batch.alter_column(name, existing_type=type_, nullable=True)


def downgrade() -> None:
    bind = op.get_bind()
    fill = sa.text(FILL_POSTGRESQL if bind.dialect.name == "postgresql" else FILL_SQLITE)
    low, high = bind.execute(
        sa.text(f"SELECT min(id), max(id) FROM {TABLE} WHERE {_unrecorded()}")  # noqa: S608
    ).one()
    if low is not None:
        for start in range(low, high + 1, BACKFILL_ROWS):
            bounds = {"low": start, "high": start + BACKFILL_ROWS}
            bind.execute(fill, bounds)
            bind.execute(sa.text(FILL_GONE), bounds)
    with op.batch_alter_table(TABLE) as batch:
        for name, type_ in COLUMNS:
            batch.alter_column(name, existing_type=type_, nullable=False)
