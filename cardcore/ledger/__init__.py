"""The ledger: double-entry transfers, the group-commit writer, the hash-chained journal."""
