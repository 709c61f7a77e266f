"""The batch of a terminal's last claimed key: `pos_terminals.claims_batch`.

A POS call read its money keys against `pos_claims` (a key is one transaction, whatever
function it is sent with), one round trip per call that most calls need not make: a
terminal none of whose keys in its open batch was claimed by a feature request has nothing
to find there. `claims_batch` keeps "cycle/batch" of the batch of the terminal's last
claim, written with the claim (the claim statement, `cards.schema.CLAIM_SQL`); "" when none
since it was registered or its batch closed. The POS reads the claims only for terminals
that may have one in their open batch (docs/benchmarks.md, fifteenth session).

Running code: the column is nullable and NULL means "not known": the terminals registered
before this revision are read against the claims as before, until their batch closes.
Code older than this revision neither writes nor reads it; a key it claims while both run
(a rolling upgrade) leaves the mark it found, so a terminal it served is read as before only
while its mark is NULL: finish an upgrade before terminals reuse keys across functions (they
never should: the 94 answer is for a faulty terminal).

Timeouts: migrations/env.py sets them on PostgreSQL; adding a nullable column changes the
catalogue only.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pos_terminals") as batch:
        batch.add_column(sa.Column("claims_batch", sa.String(24), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pos_terminals") as batch:
        batch.drop_column("claims_batch")
