-- One transfer, one commit: a debit with a floor check, a credit, a journal insert.
\set a random(1, :accounts)
\set b random(1, :accounts)
\set amount random(1, 10000)
BEGIN;
UPDATE pgb_accounts SET balance = balance - :amount, version = version + 1
    WHERE id = :a AND balance >= :amount AND :a <> :b;
UPDATE pgb_accounts SET balance = balance + :amount, version = version + 1
    WHERE id = :b AND :a <> :b;
INSERT INTO pgb_journal (debit_account, credit_account, amount) VALUES (:a, :b, :amount);
END;
