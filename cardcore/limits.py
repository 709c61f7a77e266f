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
# Committed accounts the writer keeps in memory instead of reading them again; the least
# recently used go first. About 0.5 KB each, and each one's four objects are walked by every
# full garbage collection: 20,000 add about 5 ms to one (100,000 added 45 ms). Enough for the
# hot accounts (stores' tills and sales, clearing between entities) and the recent cards.
WRITER_ACCOUNTS_CACHED_MAX: Final = 20_000

# --- database ------------------------------------------------------------------------------
# Pooled connections of a process, the writer's two (write, read) among them. A unit holds
# its connection across its round trips, each a turn of a busy event loop: with 8, the POS
# mix of issue 5 queued for connections (1,000 terminals: 927 -> 1,308 tx/s with 24, 48 no
# better; the plain purchase mix the same either way; docs/benchmarks.md, eighth session).
DB_POOL_SIZE_MAX: Final = 24
DB_CONNECT_TIMEOUT_S: Final = 10
DB_CONNECT_TIMEOUT_S_MAX: Final = 300  # the most a URL's connect_timeout may ask for
DB_STATEMENT_TIMEOUT_MS: Final = 30_000
DB_LOCK_TIMEOUT_MS: Final = 5_000
# A migration's CREATE INDEX CONCURRENTLY (0013): it waits for older transactions and reads
# the whole table, blocking no writer meanwhile, so the two bounds above would only make it
# fail on a large table or behind one long transaction; this bounds both instead.
DB_INDEX_BUILD_TIMEOUT_MS: Final = 3_600_000
# How long `cardcore migrate` waits for another migrate of the same database to end (it then
# finds the schema current and does nothing); beyond it, it stops and says so. The longest a
# migration's step may take (an index built concurrently), and 10 minutes more.
MIGRATE_LOCK_WAIT_S: Final = 4_200  # DB_INDEX_BUILD_TIMEOUT_MS (3,600 s) + 600 s
DB_STATEMENTS_CACHED_MAX: Final = 512  # prepared statements asyncpg keeps per connection
SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
DB_INSERT_ROWS_MAX: Final = 1000  # rows in one multi-row INSERT (bulk card issuance)
SQLITE_WAL_CHECKPOINT_PAGES_MAX: Final = 10_000  # WAL pages (about 40 MiB) before a checkpoint

# --- reads ---------------------------------------------------------------------------------
PAGE_LIMIT_DEFAULT: Final = 100
PAGE_LIMIT_MAX: Final = 1000
JOURNAL_PAGE_BATCHES_MAX: Final = 500
VERIFY_CHUNK_BATCHES: Final = 1000  # batches read per query by `cardcore ledger verify`
# ...and at most this many rows of any one journal table per read (a batch with more comes
# alone: the writer bounds it, batch_size_max operations plus one request); also the
# accounts it reads per page. Bounds verify's memory with the accounts, not the history.
VERIFY_CHUNK_ROWS_MAX: Final = 10_000
VERIFY_FETCH_ROWS_MAX: Final = 1000  # reversals and refunds verify fetches per round trip

# --- HTTP service --------------------------------------------------------------------------
SHUTDOWN_GRACE_S: Final = 10  # finish in-flight requests at most this long
HTTP_CLIENT_TIMEOUT_S: Final = 30  # the benchmark's and other internal clients' requests
# Slow and idle clients of the HTTP listeners (cardcore.api.listener; aiohttp bounds none of
# them: a client sending a byte a second held its connection for an hour, or for ever).
HTTP_HEADERS_READ_S: Final = 10  # a request's head, once begun (a new connection's: once open)
# A body, from when its handler starts reading it, else 408 request_timeout. The largest,
# REQUEST_BODY_BYTES_MAX (2 MiB), takes 2.1 s at 1 MB/s: 30 s lets it through at 70 kB/s.
HTTP_BODY_READ_S: Final = 30
HTTP_BODY_LINGER_S: Final = 5  # a body no handler read is read and dropped this long, then closed
# Between requests. Above the gateway's pooled connections' GATEWAY_HOST_KEEPALIVE_S (30 s)
# and a proxy's usual upstream idle time (60 s): the client closes first, so it never
# reuses a connection the server is closing.
HTTP_KEEPALIVE_IDLE_S: Final = 75
# Open connections of one listener; one more is closed as soon as it is accepted. Above the
# benchmark's BENCH_CLIENTS_MAX (4,096) and a gateway's GATEWAY_HOST_CALLS_MAX (64) each.
HTTP_CONNECTIONS_MAX: Final = 5_000
HTTP_WATCHDOG_MS: Final = 500  # how often the head deadlines are checked

# --- POS host (cardcore.cards) ---------------------------------------------------------------
POS_REQUESTS_PER_CALL_MAX: Final = 1024  # POS requests in one POST /internal/v1/pos
POS_AMOUNT_MAX: Final = 999_999_999_999  # F4 is twelve digits of fen
# Feature requests (coupons, points, service and manager cards) of one POS call answered at
# once, each on its own pooled connection while it runs: a call waits for the slowest of
# them, not for their sum (docs/benchmarks.md, tenth session). Below DB_POOL_SIZE_MAX, so
# one call of many coupons cannot hold every connection; calls at once share the pool's
# queue (DB_CONNECT_TIMEOUT_S), as they did before.
POS_FEATURE_PLANS_CONCURRENT_MAX: Final = 16
POS_UPLOAD_LINES_MAX: Final = 64  # transaction lines in one batch-upload request
POS_TOTALS_COUNT_MAX: Final = 999  # a settlement's counts are three digits (F48, n3)
READY_DATABASE_CHECK_MS: Final = 2_000  # /readyz: the database answers SELECT 1 within
DB_ERROR_LOG_INTERVAL_S: Final = 10  # a database error's traceback at most this often
TOPUP_CONFIRM_S: Final = 600  # a top-up hold waits this long for the terminal's confirmation
TOPUP_GRANT_SWEEP_FIRST_S: Final = 30  # the server's first look at top-up holds that ended
TOPUP_GRANT_SWEEP_EVERY_S: Final = 60  # then every minute: a lapsed hold's grant spend back
TOPUP_GRANT_SWEEP_PAGE_ROWS_MAX: Final = 500  # open top-up grant spends one sweep reads a page
# A new card's fee recorded this long ago with no card written is given back by the sweep
# (`CardService.sweep_fee_intents`): far longer than any issue request takes.
CARD_FEE_INTENT_STALE_S: Final = 600
CARD_FEE_SWEEP_EVERY_S: Final = 300  # the server's card fee sweep, after TOPUP_GRANT_SWEEP_FIRST_S
CARD_FEE_SWEEP_PAGE_ROWS_MAX: Final = 500  # fee records one sweep reads a page
REVERSAL_CHAIN_MAX: Final = 16  # a purchase voided and reinstated (void reversed) 8 times
CARD_CACHE_ENTRIES_MAX: Final = 200_000  # card and terminal records the host keeps in memory
CARD_WARM_MAX: Final = 512  # cards one POS call reads together (GATEWAY_HOST_BATCH_MAX)
CARD_FEE_ATTEMPTS_MAX: Final = 8  # a card's fee taken again after its change was refused
RECORDS_STATEMENTS_MAX: Final = 2048  # built statements records.Unit keeps (one per query shape)
CARD_ISSUE_BATCH_MAX: Final = 100_000  # cards issued by one command

# --- organization, staff and audit (cardcore.org) --------------------------------------------
RECORD_ID_MAX: Final = 2**31 - 1  # ids of 32-bit integer columns (staff, tokens, grants, audit)
TOKEN_TTL_S_DEFAULT: Final = 90 * 24 * 3600  # an API token expires after this unless told
TOKEN_TTL_S_MAX: Final = 2 * 365 * 24 * 3600
TOKEN_CACHE_S: Final = 5  # a token's record is re-read at least this often (revocation lag)
TOKEN_CACHE_ENTRIES_MAX: Final = 10_000
TOKENS_PER_USER_MAX: Final = 20  # live tokens one staff user may hold
SCHEMA_VALIDATORS_MAX: Final = 1000  # compiled request schemas kept (routes have ~100)
AUDIT_VALUE_BYTES_MAX: Final = 16 * 1024  # the JSON of one before/after image

# --- members and card products (cardcore.members, cardcore.cards) -----------------------------
PIN_FAILURES_MAX: Final = 3  # wrong PINs in a row before the card's PIN locks
PIN_DIGITS_MIN: Final = 4
PIN_DIGITS_MAX: Final = 6
DENOMINATIONS_MAX: Final = 16  # gift-card face values of one card class
DISCOUNT_BP_MAX: Final = 10_000  # a card class's discount, basis points off the price
POINTS_MULTIPLIER_PCT_MAX: Final = 10_000  # 100 = the program's own rate
CARD_VALIDITY_MONTHS_MAX: Final = 600
BEARER_VALIDITY_MONTHS_MIN: Final = 36  # bearer stored-value cards live at least three years
NAMED_BALANCE_DEFAULT: Final = 500_000  # fen: 5,000 CNY on a named stored-value card
BEARER_BALANCE_DEFAULT: Final = 100_000  # fen: 1,000 CNY on a bearer card
CARD_CLOSE_ATTEMPTS_MAX: Final = 5  # reads and refunds of the last balance when closing a card
EXPORT_ROWS_MAX: Final = 100_000  # rows in one CSV export
MEMBER_NAME_CHARS_MAX: Final = 64
EMAIL_CHARS_MAX: Final = 128
MOBILE_CHARS_MAX: Final = 32  # a mobile number as typed (spaces, dashes, prefix) before normalizing
ID_NUMBER_CHARS_MAX: Final = 32  # an ID document number of type "other"
# What the admin API's schema lets through of a typed mobile, birthday or ID number: the
# member rules refuse anything longer that is wrong with their own codes (invalid_mobile...).
MEMBER_TYPED_CHARS_MAX: Final = 256
ID_NUMBER_BYTES_MAX: Final = 96  # its UTF-8, so its ciphertext fits members.id_sealed
MEMBER_CARDS_SHOWN_MAX: Final = 100  # cards listed in one member's view (`cards_more` says more)
CARD_ISSUE_ATTEMPTS_MAX: Final = 5  # fresh numbers drawn / ids re-read when an issue clashes
RECEIPT_CHARS_MAX: Final = 32  # a counter receipt number (transfer metadata external_ref)
COUNTER_KEY_CHARS_MAX: Final = 64  # the caller's idempotency key of a counter top-up or sale
# The operator in a counter transfer's metadata: a whole staff user name (1-32 characters,
# org.model.CODE), so two clerks are never one name; a metadata value may take 64.
OPERATOR_CHARS_MAX: Final = 32
REPORT_READ_ROWS_MAX: Final = 1000  # cards read per query while a report sums them
REPORT_TERMINALS_MAX: Final = 10_000  # terminals a scoped settlement report reads first

# --- front-end gateway (cardcore.frontend_gateway) -------------------------------------------
GATEWAY_CONNECTIONS_MAX: Final = 30_000  # open terminal connections in one gateway process
GATEWAY_FRAME_BYTES_MAX: Final = 2048  # TPDU + header + ISO message; jPOS allows 100,000
GATEWAY_FRAME_READ_S: Final = 10  # a frame, once begun, arrives whole within this
GATEWAY_IDLE_S: Final = 300  # a connection with no frame this long is closed (jPOS default)
GATEWAY_WRITE_S: Final = 10  # a reply the terminal does not take within this closes it
GATEWAY_WATCHDOG_MS: Final = 500  # how often the idle and frame timeouts are checked
GATEWAY_HOST_TIMEOUT_MS: Final = 8_000  # answer 96 before the terminal's own 30-60 s timeout
GATEWAY_IN_FLIGHT_WAIT_S: Final = 10  # a resent request waits this long for the first
GATEWAY_TERMINAL_RATE_PER_S: Final = 20  # requests per terminal per second (burst the same)
# Sign-ons per terminal per second (burst the same), a budget of their own: a terminal signs
# on a few times a day, and a stranger's sign-ons never spend its budget for sales.
GATEWAY_SIGN_ONS_PER_S: Final = 5
# The most `gateway_terminal_rate_per_s` may be set to (a terminal sends one request at a time).
GATEWAY_TERMINAL_RATE_PER_S_MAX: Final = 1_000
GATEWAY_BAD_FRAMES_MAX: Final = 5  # undecodable messages in a row before the connection closes
GATEWAY_MAC_FAILURES_MAX: Final = 3  # wrong MACs in a row before the terminal must sign on
GATEWAY_PENDING_KEYS_MAX: Final = 4  # key sets sign-ons issued beside the keys still in use
GATEWAY_HOST_BATCH_MAX: Final = 512  # POS requests the HTTP host adapter sends in one call
GATEWAY_HOST_BATCH_WAIT_MS: Final = 2  # how long a call waits for company
GATEWAY_SESSION_TURNS_MAX: Final = 3  # sign-on/off: sessions replaced while it waited, followed
GATEWAY_HOST_QUEUE_MAX: Final = 8192  # POS requests waiting for the host; more answer 96
GATEWAY_HOST_CALLS_MAX: Final = 64  # HTTP host: calls in flight (and pooled connections)
GATEWAY_HOST_CONNECT_MS: Final = 1_000  # HTTP host: a ledger that does not accept is skipped
GATEWAY_HOST_KEEPALIVE_S: Final = 30  # HTTP host: idle pooled connections kept this long
GATEWAY_LISTEN_BACKLOG_MAX: Final = 4096  # connections the kernel queues before accept
GATEWAY_TLS_HANDSHAKE_S: Final = 10  # a TLS handshake not done by then is dropped
GATEWAY_UPLOAD_LINES_MAX: Final = 8  # batch-upload lines in one 0320 (UnionPay: 8)
GATEWAY_UNKNOWN_TERMINAL_S: Final = 30  # an unknown terminal id is answered 97 without asking
GATEWAY_UNKNOWN_TERMINALS_MAX: Final = 10_000  # unknown ids remembered at once
GATEWAY_SAF_RETRY_MS: Final = 1_000  # store-and-forward: pause between delivery rounds
GATEWAY_SAF_ENTRIES_MAX: Final = 100_000  # undelivered reversals; past it the gateway says 96
GATEWAY_SAF_COMPACT_BYTES: Final = 4 * 1024 * 1024  # SAF file growth since its last rewrite
GATEWAY_SHUTDOWN_GRACE_S: Final = 10  # in-flight requests finish within this on shutdown
POS_STATE_REQUESTS_MAX: Final = 64  # `cardcore pos`: this batch's requests kept to reverse

# --- benchmark -----------------------------------------------------------------------------
BENCH_SECONDS_MAX: Final = 3600
BENCH_CLIENTS_MAX: Final = 4096
BENCH_ACCOUNTS_MAX: Final = 1_000_000
BENCH_SERVER_START_S_MAX: Final = 60
BENCH_TERMINALS_MAX: Final = 9_999  # buying terminals: one member each, mobile 139RRRRiiii
BENCH_IDLE_TERMINALS_MAX: Final = 30_000  # terminals that only hold a connection (--idle)
BENCH_RATE_PER_S_MAX: Final = 1_000_000
BENCH_RETRY_PAUSE_MS: Final = 10  # a load client's pause after a failed request
BENCH_ANSWER_HEAD_BYTES_MAX: Final = 64 * 1024  # status line and headers of an answer
BENCH_ANSWER_BYTES_MAX: Final = 64 * 1024 * 1024  # an answer's body
BENCH_SPARE_FILES_MIN: Final = 1024  # open files asked for beyond two per connection
BENCH_SHOWN_CHARS_MAX: Final = 200  # of an answer the benchmark cannot use, in its error

# --- service and manager cards ---
SERVICE_USES_MAX: Final = 1000  # entitlements in one service package ("ten car washes" = 10)
SERVICE_PRICE_FEN_MAX: Final = 100_000_000  # a package's price, its fee, its one-use list price
SERVICE_VALIDITY_MONTHS_MAX: Final = 120  # months a sold package lives (to the month's end)
SERVICE_STORES_MAX: Final = 500  # stores named on one product (none named = every store)
SERVICE_NAME_CHARS_MAX: Final = 64  # a service product's display name
SERVICE_PRODUCT_CHARS_MAX: Final = 32  # a service product's code (String(32))
SERVICE_ENTITLEMENTS_PER_CARD_MAX: Final = 256  # packages one card holds and a choice reads
SERVICE_REFUNDS_READ_MAX: Final = 100  # a package's latest refund audit rows a key looks in
SERVICE_REDEEM_ATTEMPTS_MAX: Final = 5  # choices of a package when terminals take it at once
MANAGER_PERCENT_BP_MAX: Final = 10_000  # a manager card's cap per transaction (100 %)
MANAGER_DAILY_FEN_MAX: Final = 100_000_000  # discount one manager card authorizes per local day
MANAGER_REASONS_MAX: Final = 32  # reason codes allowed on one manager card
MANAGER_REASON_CHARS_MAX: Final = 16  # one reason code ("damaged", "vip", "price_match")

# --- coupons (cardcore.coupons) ----------------------------------------------------------------
COUPON_CODE_CHARS_DEFAULT: Final = (
    15  # random base32 symbols of a code (75 bits); a check symbol follows
)
COUPON_CODE_CHARS_MIN: Final = 12  # 60 random bits: guessing stays hopeless
COUPON_CODE_CHARS_MAX: Final = 32
COUPON_TYPED_CHARS_MAX: Final = 64  # a code as typed or scanned (spaces, hyphens) before parsing
COUPON_IMPORTED_CHARS_MIN: Final = 4  # a partner's code, imported as it is
COUPON_IMPORTED_CHARS_MAX: Final = 32
COUPON_NAME_CHARS_MAX: Final = 64  # a campaign's name
COUPON_VALUE_FEN_MAX: Final = 10_000_000  # fen: 100,000 CNY; a face value, cap or minimum spend
COUPON_ISSUED_MAX: Final = 100_000_000  # codes one campaign may issue
COUPON_VALIDITY_DAYS_MAX: Final = 3660  # a campaign runs at most ten years
COUPON_STORES_MAX: Final = 1000  # stores named by one campaign
COUPON_DEPARTMENTS_MAX: Final = 100  # departments named by one campaign
COUPON_PER_MEMBER_MAX: Final = 10_000  # redemptions per member a campaign may allow
COUPON_BASKET_LINES_MAX: Final = 1000  # department lines of one bill a coupon is checked against
COUPON_PER_TRANSACTION_MAX: Final = 10  # coupons combined in one transaction
COUPON_POS_TOGETHER_MAX: Final = 64  # POS coupon reads, or holds, of one turn in one statement
COUPON_QR_CHARS_MAX: Final = 512  # a scanned QR text: payload, "|" and signature
COUPON_QR_CODE_CHARS_MAX: Final = 64  # the code field of a QR payload
COUPON_QR_EXPIRY_DIGITS_MAX: Final = 15  # Unix ms in decimal (13 digits until the year 2286)
COUPON_QR_NONCE_BYTES: Final = 16  # random bytes, 32 lowercase hex characters

# --- points -------------------------------------------------------------------------------------
POINTS_PER_TXN_MAX: Final = 1_000_000_000  # points one earning, spend, clawback or transfer moves
POINTS_RULES_PER_PROGRAM_MAX: Final = 64  # earning rules of one program
POINTS_PRIORITY_MAX: Final = 9_999  # a rule's stacking order (lower applies first)
POINTS_RATE_MAX: Final = 1_000_000  # a rule's points or per_fen; a redemption block's points or fen
POINTS_BONUS_PCT_MAX: Final = 10_000  # a bonus rule's extra percent of the points so far
POINTS_RULE_SET_ITEMS_MAX: Final = 500  # stores, departments or categories one rule names
POINTS_BASKET_LINES_MAX: Final = 1000  # basket lines one earning looks at
POINTS_CODE_CHARS_MAX: Final = 32  # program, rule and tier codes (String(32) in points_* tables)
POINTS_PENDING_DAYS_MAX: Final = 90  # the return window before earned points become usable
POINTS_EXPIRY_MONTHS_MAX: Final = 120  # a rolling expiry term, or a fixed date's minimum months
POINTS_TIERS_MAX: Final = 16  # tiers on one ladder
POINTS_TRANSFER_PER_DAY_MAX: Final = 1_000_000_000  # ceiling of a program's daily transfer max
POINTS_OPEN_LOTS_MAX: Final = 100_000  # lots with points left that one spend or clawback reads
POINTS_POS_TOGETHER_MAX: Final = 64  # POS points redemptions of one turn read together
POINTS_REMINDER_DAYS_MAX: Final = 366  # how far ahead an expiry reminder looks
POINTS_MEMBER_CARDS_READ_MAX: Final = 1000  # a member's cards a transfer's daily limit sums
CARD_TOPUP_RECORDS_READ_MAX: Final = 1000  # a card's latest top-up records a retry looks in

# --- issue 5 at the POS ---
POS_BASKET_LINES_MAX: Final = 32  # (department, fen) lines one POS request carries (F48)

# --- e-coupons: service, admin API, POS ---
COUPON_RESERVE_S: Final = 300  # a POS reservation holds a code this long, then it is free again
COUPON_UNDO_READS_MAX: Final = 3  # reserved -> redeemed -> reversed: a read overtaken twice
COUPON_INSERT_CHUNK_MAX: Final = 10_000  # generated codes written per transaction
COUPON_GENERATE_ROUTE_MAX: Final = 10_000  # codes one admin request generates (the CLI: more)
COUPON_GENERATE_CLI_MAX: Final = 10_000_000  # codes one `cardcore coupons generate` makes
COUPON_GENERATE_ATTEMPTS_MAX: Final = 5  # fresh draws of a chunk whose code clashed
COUPON_BUDGET_READS_MAX: Final = 3  # reads of a campaign changed while a redemption counts
COUPON_IMPORT_CODES_MAX: Final = 1000  # partner codes one import request carries
COUPON_ISSUE_MEMBERS_MAX: Final = 10_000  # members one issuance reaches (a list or a segment)
COUPON_SEGMENT_DAYS_MAX: Final = 366  # local days of a spend segment's period (since..until)
COUPON_SEGMENT_YEAR_MIN: Final = 1971  # a spend segment's dates: no earning is older
COUPON_SEGMENT_YEAR_MAX: Final = 9998  # ... and the local day's start stays a timestamp
COUPON_REWARD_CAMPAIGNS_MAX: Final = 100  # active campaigns one purchase is checked against
COUPON_CLIENT_KEY_CHARS_MAX: Final = 64  # an issuance's client idempotency key

# --- points engine: service, POS, expiry job ---
POINTS_EXPIRY_PAGE_ROWS_MAX: Final = 1000  # lot accounts the expiry job reads per page
POINTS_REMINDER_DAYS_DEFAULT: Final = 7  # `cardcore points expire`: reminders this far ahead
POINTS_TIER_EARNINGS_READ_MAX: Final = 100_000  # earnings of one holder a tier period sums
POINTS_EXPIRY_FIRST_S: Final = 60  # the server's first points expiry run, after it starts
POINTS_EXPIRY_EVERY_S: Final = 900  # then every quarter hour (lots expire at local midnight)
POINTS_FORFEIT_LOTS_MAX: Final = 1024  # point accounts a close forfeits a page (REQUEST_OPS_MAX)
POS_SALE_CHARS_MAX: Final = 24  # a terminal's sale number (F48 SN): the coupons of one sale
COUPON_CAMPAIGNS_PARSED_MAX: Final = 1024  # campaign definitions kept parsed (a pure cache)
COUPON_REWARD_CACHE_S: Final = (
    5  # a reward campaign changed elsewhere applies at the till this late
)
POINTS_DEFINITIONS_CACHE_S: Final = (
    5  # a program, rule or points grant changed elsewhere applies at the till this late
)
POINTS_GRANTS_CACHED_MAX: Final = 4_096  # (store, program) points grants held (then cleared)
POINTS_PROGRAMS_CACHED_MAX: Final = 256  # programs (and their rule lists) held, then cleared

# --- process ---------------------------------------------------------------------------------
GC_YOUNG_OBJECTS_MAX: Final = 20_000  # net new objects between collections (CPython: 700)
