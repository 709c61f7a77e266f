"""Manager-card tables (SQLAlchemy Core, on the ledger's MetaData); migration 0005 makes them.

A manager card is found by the keyed hash of its number (the number only as ciphertext), is
bound to one staff user (read with it at every use: `card_and_holder_select`), and has its
own PIN verification value and wrong-PIN count. Every
authorization, approved or refused, is a row under its POS key (the audit of every use; the
daily total sums the approved, unreversed ones of the local day).
"""

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    Select,
    String,
    Table,
    Text,
    bindparam,
    select,
)

from cardcore.ledger.schema import metadata
from cardcore.org.schema import staff_users

CODE = 32
KEY = 160

manager_cards = Table(
    "manager_cards",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("token", String(64), nullable=False, unique=True),
    Column("pan_masked", String(19), nullable=False),
    Column("pan_sealed", String(128), nullable=False),
    Column("staff_user_id", Integer, nullable=False),
    Column("store", String(CODE), nullable=False),
    Column("legal_entity", String(CODE), nullable=False),
    Column("definition", Text, nullable=False),  # percent, daily total, reasons (JSON)
    Column("pvv", String(64), nullable=False),
    Column("pin_failures", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
    Index(None, "staff_user_id"),
)

manager_authorizations = Table(
    "manager_authorizations",
    metadata,
    Column("key", String(KEY), primary_key=True),
    Column("card", Integer, nullable=False),
    Column("staff_user_id", Integer, nullable=False),
    Column("store", String(CODE), nullable=False),
    Column("terminal", String(8), nullable=False),
    Column("day", Integer, nullable=False),
    Column("bill_fen", BigInteger, nullable=False),
    Column("discount_fen", BigInteger, nullable=False),
    Column("reason", String(CODE), nullable=False),
    Column("outcome", String(CODE), nullable=False),  # "approved" or the refusal code
    Column("reversed", Boolean, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Index(None, "card", "day"),
    Index(None, "staff_user_id", "day"),  # the manager's day's total (migration 0018)
)


# The labels `card_and_holder_select` gives the staff user's columns.
HOLDER = (("holder_state", "state"), ("holder_role", "role"),
          ("holder_scope_kind", "scope_kind"), ("holder_scope_id", "scope_id"))  # fmt: skip


def card_and_holder_select() -> Select[Any]:
    """A manager card (`id`) with its staff user's state, role and scope (labelled by
    `HOLDER`; NULL when there is no such user), in one statement: what a use at the POS
    reads under the card's lock."""
    user = staff_users
    holder = [user.c[column].label(label) for label, column in HOLDER]
    joined = manager_cards.outerjoin(user, user.c.id == manager_cards.c.staff_user_id)
    return (
        select(manager_cards, *holder)
        .select_from(joined)
        .where(manager_cards.c.id == bindparam("id", type_=Integer))
    )
