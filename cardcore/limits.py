"""Every bound in cardcore, named here with its unit last.

Nothing in the code base may grow without limit: queues, batches, request bodies, strings,
pages, retries and timeouts all take their bound from this module. Configuration may lower or
raise the tunable ones (``cardcore.config``), never past the hard ``*_MAX`` ceilings below.
"""

from typing import Final

# --- amounts -------------------------------------------------------------------------------
AMOUNT_MAX: Final = 2**63 - 1  # one posting; balances are BIGINT, so every sum is checked too
BALANCE_MAX: Final = 2**63 - 1

# --- ledger request shape ------------------------------------------------------------------
REQUEST_OPS_MAX: Final = 1024  # operations in one POST /internal/v1/ops
REQUEST_BODY_BYTES_MAX: Final = 2 * 1024 * 1024
POSTINGS_PER_TRANSFER_MAX: Final = 16
KEY_CHARS_MAX: Final = 128  # idempotency key
CLIENT_CHARS_MAX: Final = 64  # idempotency scope
REASON_CHARS_MAX: Final = 32
METADATA_VALUE_CHARS_MAX: Final = 64
NAME_CHARS_MAX: Final = 64  # legal entity, owner kind/id, purpose, asset name
ASSET_CODE_CHARS_MAX: Final = 32
ASSET_SCALE_MAX: Final = 6
PENDING_TIMEOUT_S_MAX: Final = 90 * 24 * 3600  # a hold lives at most one quarter

# --- writer (group commit) -----------------------------------------------------------------
WRITER_QUEUE_REQUESTS_MAX: Final = 4096  # requests waiting; each holds <= REQUEST_OPS_MAX ops
BATCH_SIZE_MAX_DEFAULT: Final = 2048  # operations decided and committed together
BATCH_SIZE_MAX_CEILING: Final = 16384
BATCH_WAIT_MS_MAX_DEFAULT: Final = 1  # how long a batch waits for company
BATCH_WAIT_MS_MAX_CEILING: Final = 100
EXPIRY_SCAN_INTERVAL_MS: Final = 250  # how often the writer looks for timed-out holds
EXPIRY_OPS_PER_BATCH_MAX: Final = 512
WRITER_RECOVERY_SLEEP_MS: Final = 200  # pause after a failed commit before the next batch
WRITER_RECOVERY_ATTEMPTS_MAX: Final = 50  # consecutive failed commits before readyz says no

# --- database ------------------------------------------------------------------------------
DB_POOL_SIZE_MAX: Final = 8  # reader connections (the writer holds one more)
DB_CONNECT_TIMEOUT_S: Final = 10
DB_STATEMENT_TIMEOUT_MS: Final = 30_000
DB_LOCK_TIMEOUT_MS: Final = 5_000
SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
SQLITE_WAL_CHECKPOINT_PAGES_MAX: Final = 10_000  # WAL pages (about 40 MiB) before a checkpoint

# --- reads ---------------------------------------------------------------------------------
PAGE_LIMIT_DEFAULT: Final = 100
PAGE_LIMIT_MAX: Final = 1000
JOURNAL_PAGE_BATCHES_MAX: Final = 500
VERIFY_CHUNK_BATCHES: Final = 1000  # batches read per query by `cardcore ledger verify`

# --- HTTP service --------------------------------------------------------------------------
SHUTDOWN_GRACE_S: Final = 10  # finish in-flight requests at most this long
HTTP_CLIENT_TIMEOUT_S: Final = 30  # the benchmark's and other internal clients' requests

# --- benchmark -----------------------------------------------------------------------------
BENCH_SECONDS_MAX: Final = 3600
BENCH_CLIENTS_MAX: Final = 4096
BENCH_ACCOUNTS_MAX: Final = 1_000_000
BENCH_SERVER_START_S_MAX: Final = 60
