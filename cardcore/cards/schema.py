"""The host's card, card-class and terminal tables (SQLAlchemy Core); migrations 0003 and
0004 create them.

Mutable, written by the host service: pos_terminals (the open batch moves on at each
settlement), cards, card_classes. pos_settlements gets one row per closed terminal batch and
is only ever inserted into (by use: unlike the ledger's journal, no trigger enforces it).

A card is found by its token (a keyed hash of the number); the number itself is kept only as
AES-GCM ciphertext (`pan_sealed`), the PIN only as a verification value (`pvv`). A replaced
card and its successor share the stored-value account: the balance and its history move with
the holder, never through a transfer that could race a purchase.
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
    # model.Terminal.claims_batch (migration 0016): NULL not known, "" none in the open batch.
    Column("claims_batch", String(24), nullable=True),
)

cards = Table(
    "cards",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("pan_masked", String(19), nullable=False),
    Column("legal_entity", String(NAME), nullable=False),
    Column("account_id", BigInteger, nullable=False, index=True),
    Column("expires", String(4), nullable=False),
    # inactive | active | frozen | lost | closed | replaced
    Column("state", String(16), nullable=False),
    Column("balance_max", BigInteger, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("id", BigInteger, nullable=False, unique=True),
    Column("pan_sealed", String(128), nullable=False),
    Column("secret_sealed", String(128), nullable=False),
    Column("class_code", String(32), nullable=False, index=True),
    Column("member_id", Integer, nullable=True, index=True),
    Column("store", String(NAME), nullable=False, index=True),
    Column("named", Boolean, nullable=False),
    Column("pvv", String(64), nullable=False),
    Column("pin_failures", Integer, nullable=False),
    Column("replaced_by", BigInteger, nullable=True),
    Column("updated_at_ms", BigInteger, nullable=False),
    # The issue fee a batch card still owes, in fen: paid when it is handed out (activated
    # or sold), then 0. A card issued at the counter paid its fee then (0).
    Column("fee_due", BigInteger, nullable=False, server_default="0"),
)

card_classes = Table(
    "card_classes",
    metadata,
    Column("code", String(32), primary_key=True),
    Column("name", String(NAME), nullable=False),
    Column("named", Boolean, nullable=False),
    Column("gift", Boolean, nullable=False),
    Column("denominations", String(256), nullable=False),  # JSON array of fen
    Column("discount_bp", Integer, nullable=False),
    Column("points_multiplier_pct", Integer, nullable=False),
    Column("points_program", String(32), nullable=False, server_default=""),  # "" = none
    Column("issue_fee", BigInteger, nullable=False),
    Column("replace_fee", BigInteger, nullable=False),
    Column("balance_max", BigInteger, nullable=False),
    Column("validity_months", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
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

# The function each POS transaction key was first used for by a feature request (coupons,
# service and manager cards, points): a key is one transaction, whatever function it is sent
# with (docs/card-protocol.md section 10), so a request of another function under it is
# answered 94 (`PosService._key_conflicts`). Money requests are kept by the ledger under their
# key and are not claimed here; they are checked against this table. Only ever inserted into.
pos_claims = Table(
    "pos_claims",
    metadata,
    Column("key", String(limits.KEY_CHARS_MAX), primary_key=True),
    Column("function", String(16), nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)

# PostgreSQL: claim the keys of $1 for the functions of $2 (one array each, one element per
# key) at $3 (ms), in one statement (`Directory.claim_keys`). A key the ledger holds for client
# $4 (a transfer, or a failure but a reversal's tombstone, code $5) is never claimed and comes
# back as "money"; the other keys not claimed yet are inserted (in key order); and each key's
# claim is returned, the new ones and those the statement's snapshot saw. A key another
# transaction claimed after that snapshot is in neither: the caller reads it again. Each
# terminal of $6 keeps the batch of $7 as the one of its last claim (`claims_batch`). Each key
# is one index probe per table whatever the statistics (a LATERAL subquery kept apart by its
# LIMIT 1, as `db.each_value`: an EXISTS was planned as a hash of every POS key the ledger
# holds when the tables had no statistics).
CLAIM_SQL = (
    "WITH wanted AS (SELECT * FROM unnest($1::varchar[], $2::varchar[]) AS w(key, function)),"
    " held AS (SELECT w.key FROM wanted AS w CROSS JOIN LATERAL"
    " (SELECT 1 FROM ledger_transfers AS t WHERE t.client = $4 AND t.key = w.key LIMIT 1) AS t"
    " UNION SELECT w.key FROM wanted AS w CROSS JOIN LATERAL (SELECT 1 FROM ledger_failures AS f"
    " WHERE f.client = $4 AND f.key = w.key AND f.code <> $5 LIMIT 1) AS f),"
    " marked AS (UPDATE pos_terminals AS p SET claims_batch = m.mark"
    " FROM unnest($6::varchar[], $7::varchar[]) AS m(tid, mark) WHERE p.tid = m.tid),"
    " made AS (INSERT INTO pos_claims (key, function, created_at_ms)"
    " SELECT key, function, $3::bigint FROM wanted WHERE key NOT IN (SELECT key FROM held)"
    " ORDER BY key ON CONFLICT (key) DO NOTHING RETURNING key, function)"
    " SELECT key, 'money' AS function FROM held"
    " UNION ALL SELECT key, function FROM made"
    " UNION ALL SELECT found.key, found.function FROM wanted CROSS JOIN LATERAL"
    " (SELECT c.key, c.function FROM pos_claims AS c WHERE c.key = wanted.key LIMIT 1) AS found"
    " WHERE wanted.key NOT IN (SELECT key FROM held)"
)

# The fee of a new card, recorded before the fee is taken (`CardService._fee_first`) and
# deleted in the transaction that writes the card. One left behind is a fee whose card was
# never written (the server stopped, or the request was cancelled, in between) and the sweep
# gives it back (`CardService.sweep_fee_intents`): it first turns the state from open to
# undoing, so a write that comes that late finds it gone and is refused.
card_fee_intents = Table(
    "card_fee_intents",
    metadata,
    Column("key", String(limits.KEY_CHARS_MAX), primary_key=True),  # the fee's ledger key
    Column("store", String(NAME), nullable=False),
    Column("operator", String(limits.OPERATOR_CHARS_MAX), nullable=False),
    Column("state", String(8), nullable=False),  # open, undoing
    Column("created_at_ms", BigInteger, nullable=False, index=True),
)

# The stored-value grant budget each POS top-up spent (`PosService._granted`), by the top-up's
# key, until its hold ends: confirmed ("kept"), or voided, lapsed or reversed ("returned": the
# amount given back to the grant once, in the transaction that turns the state).
pos_grant_spends = Table(
    "pos_grant_spends",
    metadata,
    Column("key", String(limits.KEY_CHARS_MAX), primary_key=True),
    Column("grant_id", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("hold_id", BigInteger, nullable=False),
    Column("state", String(8), nullable=False, index=True),  # open, kept, returned
    Column("created_at_ms", BigInteger, nullable=False),
)
