"""Inputs that once escaped the error shape: lone surrogates and absurd nesting."""

from __future__ import annotations

import json

import pytest

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
