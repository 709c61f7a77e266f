"""Each coupon code's normalised form, unique: `coupon_codes.spelling`.

A code typed at a till is read in two spellings: as a generated code, normalised (ends
trimmed, upper case, spaces and hyphens dropped, I and L read as 1, O as 0), and as a
partner's code as it is. An import refused a code whose normalised form a stored code had,
but by a look-up inside its transaction, so two imports committing at the same moment could
each miss the other's code and both be stored. `spelling` holds each code's normalised form
under a unique index: the database refuses the later of the two (the service answers it as
the look-up does, 409 `coupon_code_exists`), and every insert of a code writes it.

Fill: the codes in batches of BACKFILL_ROWS by primary key (code order), each code's
normalised form computed in Python by `normalize` below: `cardcore.coupons.model.normalize`
as it was when this revision was written (a migration does not follow later code;
tests/integration/test_coupon_spelling.py checks that they agree). The unique index is built
first, on the column still empty, and each batch looks up in it the normalised forms it is
about to write.

Codes confusable already: where stored codes share a normalised form (two imports that raced,
or pairs the look-up let in: `PA-RT0001` beside `PART-0001`, or `PART-0001` imported before
`PART0001`), the first issued (`issued_at_ms`, then the code, byte order) keeps it and each
later one stays NULL. Each left out is logged as a warning (logger `cardcore.migrations`: its
campaign, its batch and its code masked, as a code is a bearer value), then their number.
Nothing else changes: each still redeems as before (the till reads `code`, never
`spelling`). The codes left out, in full (the normalised form in SQL, exact for stored codes,
which are upper case without spaces):

    SELECT d.campaign, d.code, k.code AS kept FROM coupon_codes AS d
    JOIN coupon_codes AS k ON k.spelling = replace(replace(replace(replace(
        d.code, '-', ''), 'I', '1'), 'L', '1'), 'O', '0')
    WHERE d.spelling IS NULL

A NULL `spelling` means the unique index does not see the code. Two kinds: (1) a code left
out above: still guarded, since the code that keeps its normalised form holds it in the
index (a new code confusable with the one is confusable with the other); (2) a code written
by code older than 0013, which does not know the column, while or after this runs and until
the new code runs: guarded only by the import's look-up (a new code that is it, or whose
normalised form is it, is refused), as every code was before 0013, so an import racing with
such a write can still store a confusable pair. Nothing fills those later.

Running code: the column is nullable and nothing older reads it, so code older than 0013
keeps inserting codes (NULL) and reading them; the index refuses none of its inserts.

Timeouts: migrations/env.py sets the lock and statement timeouts of every migration on
PostgreSQL. Adding a nullable column changes the catalogue only. On PostgreSQL the index is
built CONCURRENTLY (the till keeps writing codes meanwhile; a build that failed half way is
dropped first, a valid one kept), under its own bounds (`DB_INDEX_BUILD_TIMEOUT_MS` for its
lock waits and its statement: a large table's build outlasts the migrations' 30 s), and each
batch of the fill commits on its own, so an update of a code at the till waits at most for
one batch, never for the whole fill. A run that failed half way runs again as it is: the
column and the index are kept, and the fill takes every code again and ends as one run
would.

Downgrade: drops the index and the column.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-26
"""

import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from cardcore import limits

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("cardcore.migrations")

TABLE = "coupon_codes"
COLUMN = "spelling"
INDEX = "ix_coupon_codes_spelling"
CODE_CHARS = 40  # coupon_codes.code's length, and so its normalised form's at most
BACKFILL_ROWS = 10_000  # codes filled per transaction (by primary key range)
PROBE_ROWS = 500  # normalised forms looked up in the index per statement

# `cardcore.coupons.model.normalize` when this revision was written. ASCII only: a non-ASCII
# letter is never folded into an ASCII one.
_TYPED = str.maketrans(
    {
        **{chr(c): chr(c - 32) for c in range(ord("a"), ord("z") + 1)},
        "i": "1",
        "I": "1",
        "l": "1",
        "L": "1",
        "o": "0",
        "O": "0",
        " ": None,
        "-": None,
    }
)

PAGE = sa.text(
    "SELECT code, campaign, batch, issued_at_ms FROM coupon_codes WHERE code > :after"
    " ORDER BY code LIMIT :rows"
)
HELD = sa.text(
    "SELECT code, campaign, batch, issued_at_ms, spelling FROM coupon_codes"
    " WHERE spelling IN :spellings"
).bindparams(sa.bindparam("spellings", expanding=True))
CLEAR = sa.text("UPDATE coupon_codes SET spelling = NULL WHERE code = :code")
WRITE = sa.text("UPDATE coupon_codes SET spelling = :spelling WHERE code = :code")

# Whether the index exists and is valid (None: it does not exist).
VALID = sa.text(
    "SELECT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid"
    " WHERE c.relname = :name AND pg_table_is_visible(c.oid)"
)

Rank = tuple[int, str]  # (issued_at_ms, code): the smaller was issued first


def normalize(text: str) -> str:
    """A code in its one spelling: ends trimmed, ASCII upper case, spaces and hyphens
    dropped, I and L read as 1, O as 0."""
    return text.strip().translate(_TYPED)


def _masked(code: str) -> str:
    """A code for the log: its first third, the rest hidden (a code is a bearer value)."""
    shown = len(code) // 3
    return code[:shown] + "#" * (len(code) - shown)


def _build_index() -> None:
    if op.get_bind().dialect.name != "postgresql":  # one transaction: never half built
        op.create_index(INDEX, TABLE, [COLUMN], unique=True, if_not_exists=True)
        return
    # Built CONCURRENTLY: the till keeps writing codes meanwhile. A valid index of a run that
    # failed later (in the fill) is kept; a build that failed half way leaves an invalid
    # index of that name: dropped first. The build has its own timeouts (it blocks no writer
    # while it waits for older transactions or reads the table), the migration's again after.
    bind = op.get_bind()
    with op.get_context().autocommit_block():
        valid = bind.execute(VALID, {"name": INDEX}).scalar()
        if valid:
            return
        bound = limits.DB_INDEX_BUILD_TIMEOUT_MS
        bind.execute(sa.text(f"SET lock_timeout = {bound}"))
        bind.execute(sa.text(f"SET statement_timeout = {bound}"))
        try:
            if valid is not None:
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
            op.create_index(INDEX, TABLE, [COLUMN], unique=True, postgresql_concurrently=True)
        finally:
            bind.execute(sa.text(f"SET lock_timeout = {limits.DB_LOCK_TIMEOUT_MS}"))
            bind.execute(sa.text(f"SET statement_timeout = {limits.DB_STATEMENT_TIMEOUT_MS}"))


def _commit() -> None:
    """PostgreSQL: commit the batch just filled. Alembic commits its transaction before an
    autocommit block and begins the next one after it, so no transaction of the fill holds
    the row locks of more than one batch."""
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            pass


def _holders(bind: sa.Connection, spellings: list[str], rows: dict[str, Any]) -> dict[str, Rank]:
    """The code holding each of `spellings` now (a run that failed half way, or an earlier
    batch), by normalised form; their rows into `rows`, by code."""
    held: dict[str, Rank] = {}
    for start in range(0, len(spellings), PROBE_ROWS):
        chunk = spellings[start : start + PROBE_ROWS]
        for row in bind.execute(HELD, {"spellings": chunk}):
            held[row.spelling] = (int(row.issued_at_ms), row.code)
            rows[row.code] = row
    return held


def _fill_batch(bind: sa.Connection, page: Sequence[Any]) -> list[Any]:
    """Each code of `page` gets its normalised form unless a code issued before it has it
    (in the page or in the index); one that had it and was issued later loses it. The rows
    of the codes left out."""
    rows: dict[str, Any] = {row.code: row for row in page}
    first: dict[str, Rank] = {}  # the first issued of the page, by normalised form
    out: dict[str, Rank] = {}
    for row in page:
        rank, spelling = (int(row.issued_at_ms), row.code), normalize(row.code)
        held = first.setdefault(spelling, rank)
        if rank < held:
            first[spelling] = rank
            out[held[1]] = held
        elif rank != held:
            out[row.code] = rank
    holders = _holders(bind, sorted(first), rows)
    clear: list[str] = []
    write: list[dict[str, str]] = []
    for spelling, rank in first.items():
        holder = holders.get(spelling)
        if holder == rank:
            continue  # filled by a run that failed half way
        if holder is not None and holder < rank:
            out[rank[1]] = rank
            continue
        if holder is not None:
            clear.append(holder[1])
            out[holder[1]] = holder
        write.append({"code": rank[1], "spelling": spelling})
    if clear:  # first: the index is checked row by row
        bind.execute(CLEAR, [{"code": code} for code in clear])
    if write:
        bind.execute(WRITE, write)
    return [rows[code] for code in sorted(out)]


def _fill() -> int:
    """Every code's normalised form, a batch by primary key range at a time; how many codes
    were left out (each logged)."""
    after = ""
    left_out = 0
    while True:
        bind = op.get_bind()
        page = bind.execute(PAGE, {"after": after, "rows": BACKFILL_ROWS}).all()
        if not page:
            return left_out
        for row in _fill_batch(bind, page):
            left_out += 1
            log.warning(
                "0013: coupon code %s of campaign %s (batch %s) has no spelling: a code "
                "issued before it has its normalised form",
                _masked(row.code), row.campaign, row.batch,
            )  # fmt: skip
        after = page[-1].code
        _commit()


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(TABLE)}
    if COLUMN not in columns:  # else added by a run that failed half way (PostgreSQL)
        with op.batch_alter_table(TABLE) as batch:
            batch.add_column(sa.Column(COLUMN, sa.String(CODE_CHARS), nullable=True))
    _build_index()
    left_out = _fill()
    if left_out:
        log.warning(
            "0013: %d coupon codes have no spelling, each confusable with a code issued "
            "before it (the migration's docstring lists them)", left_out,
        )  # fmt: skip


def downgrade() -> None:
    op.drop_index(INDEX, TABLE)
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column(COLUMN)
