"""Whatever JSON arrives, parsing answers a RequestError or operations: never a crash."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cardcore.ledger import wire

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_posting = st.fixed_dictionaries(
    {},
    optional={
        "account_id": _json,
        "side": st.sampled_from(["debit", "credit"]) | _json,
        "amount": _json,
    },
)


def _op_of(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    names = sorted(wire._OP_FIELDS[kind] - {"op"})
    values = {
        name: (st.lists(_posting, max_size=3) if name == "postings" else _json) for name in names
    }
    return st.fixed_dictionaries({"op": st.just(kind)}, optional=values)


_op_like = st.one_of(*[_op_of(kind) for kind in sorted(wire._OP_FIELDS)])


@settings(max_examples=400)
@given(
    st.one_of(_json, st.builds(lambda ops: {"ops": ops}, st.lists(_op_like | _json, max_size=3)))
)
def test_any_json_parses_or_is_refused_with_a_code(body: Any) -> None:
    try:
        _client, ops = wire.parse_ops_request(body)
    except wire.RequestError as exc:
        refused: wire.RequestError | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.code
        assert refused.message
    else:
        assert ops
        for op in ops:
            assert wire.parse_op(wire.encode_op(op), "x", _client) == op
