"""A manager's day's total is the manager's: `manager_authorizations` by (staff_user_id, day).

The day's total of approved special discounts was summed over the card's uses, so a
manager whose card was disabled and a new one issued the same day started the day again
with the new card. It is summed over the staff user's uses now (one active card per staff
user, `manager_user_has_card`), read through this index.

Running code: an index changes no row; code older than this revision sums by card and
never reads it.

Timeouts: migrations/env.py sets them on PostgreSQL; the table holds one row per use of a
manager card, small beside the POS tables.

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_manager_authorizations_staff_user_id_day"


def upgrade() -> None:
    op.create_index(INDEX, "manager_authorizations", ["staff_user_id", "day"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="manager_authorizations")
