-- The comparison workload for docs/benchmarks.md: one transfer per transaction, the way a
-- one-commit-per-transfer ledger does it. Lives in its own tables (pgb_*).
DROP TABLE IF EXISTS pgb_journal;
DROP TABLE IF EXISTS pgb_accounts;
CREATE TABLE pgb_accounts (
    id bigint PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0),
    version bigint NOT NULL DEFAULT 0
);
CREATE TABLE pgb_journal (
    id bigserial PRIMARY KEY,
    debit_account bigint NOT NULL,
    credit_account bigint NOT NULL,
    amount bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgb_accounts (id, balance)
SELECT g, 1000000000000 FROM generate_series(1, :accounts) AS g;
ANALYZE pgb_accounts;
