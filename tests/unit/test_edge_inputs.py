"""Inputs that once escaped the error shape: lone surrogates and absurd nesting."""

from __future__ import annotations

import json

import pytest

from cardcore import limits
from cardcore.api.app import DatabaseErrorLog
from cardcore.ledger import wire


def test_lone_surrogate_in_metadata_is_refused_before_the_writer() -> None:
    body = json.loads(
        '{"ops": [{"op": "transfer", "key": "k", "asset": "CNY", "metadata": {"store": "\\ud800"},'
        ' "postings": [{"account_id": 1, "side": "debit", "amount": 1},'
        ' {"account_id": 2, "side": "credit", "amount": 1}]}]}'
    )
    with pytest.raises(wire.RequestError) as caught:
        wire.parse_ops_request(body)
    assert (caught.value.code, caught.value.field) == (
        "invalid_characters",
        "ops[0].metadata.store",
    )


def test_a_database_outage_logs_one_traceback_per_interval_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the database is away every request fails: each logged its traceback (65 a
    minute in an operations review). One per `DB_ERROR_LOG_INTERVAL_S`, with how many were
    not logged since."""
    now = [100.0]
    errors = DatabaseErrorLog(clock=lambda: now[0])
    with caplog.at_level("ERROR", logger="cardcore.api.app"):
        for step in range(7):  # 0 .. 18 s, every 3 s
            now[0] = 100.0 + 3 * step
            try:
                _refused()
            except OSError:
                errors.log("GET", "/v1/stores")
    logged = [(r.created, getattr(r, "not_logged_since", None), r.exc_info is not None)
              for r in caplog.records]  # fmt: skip
    assert [(quiet, traced) for _, quiet, traced in logged] == [(0, True), (3, True)]
    assert limits.DB_ERROR_LOG_INTERVAL_S == 10  # 0 s logged, 3-9 s counted, 12 s logged


def _refused() -> None:
    raise OSError("connection refused")
