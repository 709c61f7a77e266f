"""The host's card and terminal tables (SQLAlchemy Core); migration 0003 creates them.

Mutable, written by the host service: pos_terminals (the open batch moves on at each
settlement), cards. pos_settlements gets one row per closed terminal batch and is only ever
inserted into (by use: unlike the ledger's journal, no trigger enforces it).
"""

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, String, Table

from cardcore import limits
from cardcore.ledger.schema import metadata

NAME = limits.NAME_CHARS_MAX

pos_terminals = Table(
    "pos_terminals",
    metadata,
    Column("tid", String(8), primary_key=True),
    Column("mid", String(15), nullable=False),
    Column("store", String(NAME), nullable=False),
    Column("legal_entity", String(NAME), nullable=False),
    Column("key_mode", String(8), nullable=False),
    Column("tmk_sealed", String(256), nullable=False),
    Column("state", String(16), nullable=False),
    Column("batch", String(6), nullable=False),
    Column("batch_cycle", Integer, nullable=False),
    Column("sales_account", BigInteger, nullable=False),
    Column("cash_account", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

cards = Table(
    "cards",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("pan_masked", String(19), nullable=False),
    Column("legal_entity", String(NAME), nullable=False),
    Column("account_id", BigInteger, nullable=False, unique=True),
    Column("expires", String(4), nullable=False),
    Column("state", String(16), nullable=False),
    Column("balance_max", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

pos_settlements = Table(
    "pos_settlements",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tid", String(8), nullable=False),
    Column("batch_cycle", Integer, nullable=False),
    Column("batch", String(6), nullable=False),
    Column("debit_amount", BigInteger, nullable=False),
    Column("debit_count", Integer, nullable=False),
    Column("credit_amount", BigInteger, nullable=False),
    Column("credit_count", Integer, nullable=False),
    Column("terminal_debit_amount", BigInteger, nullable=False),
    Column("terminal_debit_count", Integer, nullable=False),
    Column("terminal_credit_amount", BigInteger, nullable=False),
    Column("terminal_credit_count", Integer, nullable=False),
    Column("balanced", Boolean, nullable=False),
    Column("settled_at_ms", BigInteger, nullable=False),
    Index(None, "tid", "batch_cycle", "batch", unique=True),
)
