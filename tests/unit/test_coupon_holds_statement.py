"""`schema.holds_statement` refuses what one statement of holds cannot answer hold by hold:
a code or a key twice (the statement's rows would be ambiguous), or holds of two shapes."""

from __future__ import annotations

from typing import Any

import pytest

from cardcore.coupons.schema import Counted, Hold, holds_statement

REDEEMED = {
    "state": "redeemed", "reserved_key": None, "reserved_until_ms": None,
    "redeemed_key": "", "redeemed_at_ms": 5, "version": ("+", 1),
}  # fmt: skip
RESERVED = {"state": "reserved", "reserved_key": "", "reserved_until_ms": 99, "version": ("+", 1)}
COUNTED = Counted("C1", 0, 0, 100, 70, 30)


def _ask(key: str, code: str, counted: Counted | None, values: dict[str, Any]) -> Hold:
    redemption = {"key": key, "code": code}
    return Hold({**values, "redeemed_key" if counted else "reserved_key": key}, redemption, counted)


@pytest.mark.parametrize(
    "asked",
    [
        [("t:1", "K1"), ("t:2", "K1")],  # one code twice
        [("t:1", "K1"), ("t:1", "K2")],  # one key twice
    ],
)
async def test_one_statement_refuses_a_repeated_code_or_key(asked: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="distinct"):
        holds_statement([_ask(key, code, COUNTED, REDEEMED) for key, code in asked])


def test_one_statement_refuses_holds_of_two_shapes() -> None:
    with pytest.raises(ValueError, match="counted or none"):
        holds_statement([_ask("t:1", "K1", COUNTED, REDEEMED), _ask("t:2", "K2", None, REDEEMED)])
    with pytest.raises(ValueError, match="same columns"):
        holds_statement([_ask("t:1", "K1", None, REDEEMED), _ask("t:2", "K2", None, RESERVED)])


def test_one_statement_refuses_two_budgets_of_one_campaign() -> None:
    """Redemptions of one campaign that read its budget at different moments (it changed in
    between) are judged each against its own: never in one statement."""
    other = Counted("C1", 500, 0, 100, 70, 30)
    later = Counted("C1", 0, 7, 100, 70, 30)  # the same budget, read from a later version
    for second in (other, later):
        with pytest.raises(ValueError, match="one budget per campaign"):
            holds_statement(
                [_ask("t:1", "K1", COUNTED, REDEEMED), _ask("t:2", "K2", second, REDEEMED)]
            )
