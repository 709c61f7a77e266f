"""The realistic mix of `bench pos`: each kind gets exactly its share of the draws, and the
setup makes enough coupon codes and points for any shares."""

from collections import Counter

import pytest

from cardcore.bench import BenchError
from cardcore.bench_pos import (
    MIX_REDEEM_POINTS,
    MIX_SHARES_PCT_DEFAULT,
    MIX_START_POINTS_FEN,
    PosBenchOptions,
    _coupons_needed,
    _start_points_fen,
    check,
    kind_of,
)
from cardcore.limits import GATEWAY_TERMINAL_RATE_PER_S


@pytest.mark.parametrize("shares", [MIX_SHARES_PCT_DEFAULT, (0, 100, 0), (100, 0, 0), (0, 0, 100)])
def test_each_kind_gets_its_share_of_the_draws(shares: tuple[int, int, int]) -> None:
    drawn = Counter(kind_of(draw, shares, coupons=True) for draw in range(100))
    kinds = ("purchase", "coupon_purchase", "points_redeem")
    assert {k: drawn[k] for k in kinds} == dict(zip(kinds, shares, strict=True))


def test_a_coupon_purchase_without_codes_left_is_a_purchase() -> None:
    drawn = Counter(kind_of(draw, (70, 20, 10), coupons=False) for draw in range(100))
    assert drawn == {"purchase": 90, "points_redeem": 10}


def test_shares_given_with_the_plain_mix_are_refused_even_the_default() -> None:
    with pytest.raises(BenchError, match="--shares is for --mix realistic"):
        check(PosBenchOptions(terminals=2, seconds=2, shares=MIX_SHARES_PCT_DEFAULT))
    check(PosBenchOptions(terminals=2, seconds=2, mix="realistic", shares=(0, 0, 100)))
    check(PosBenchOptions(terminals=2, seconds=2))


@pytest.mark.parametrize("terminals", [1, 2, 3, 1000])
@pytest.mark.parametrize("rate", [0, 5, 400])
def test_each_store_has_a_code_for_every_coupon_purchase_its_terminals_can_make(
    terminals: int, rate: int
) -> None:
    """Terminals alternate between the two stores: the larger half of them, each at its
    share of the offered rate (or back to back at 20 messages a second, a coupon purchase
    being two), every transaction a coupon purchase, for the whole run."""
    options = PosBenchOptions(terminals, 30, rate=rate, mix="realistic", shares=(0, 100, 0))
    per_terminal_s = rate / terminals if rate else GATEWAY_TERMINAL_RATE_PER_S / 2
    assert _coupons_needed(options) >= per_terminal_s * 30 * ((terminals + 1) // 2)


@pytest.mark.parametrize("rate", [0, 5])
def test_each_card_starts_with_points_for_every_redemption_it_can_make(rate: int) -> None:
    options = PosBenchOptions(1, 30, rate=rate, mix="realistic", shares=(0, 0, 100))
    per_terminal_s = rate if rate else GATEWAY_TERMINAL_RATE_PER_S
    points = _start_points_fen(options) // 100  # 1 point a yuan
    assert points >= per_terminal_s * 30 * MIX_REDEEM_POINTS
    assert _start_points_fen(PosBenchOptions(1, 30, mix="realistic")) == MIX_START_POINTS_FEN
