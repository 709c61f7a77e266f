"""The realistic mix's draw: each kind gets exactly its share of the hundred draws."""

from collections import Counter

import pytest

from cardcore.bench_pos import MIX_SHARES_PCT_DEFAULT, kind_of


@pytest.mark.parametrize("shares", [MIX_SHARES_PCT_DEFAULT, (0, 100, 0), (100, 0, 0), (0, 0, 100)])
def test_each_kind_gets_its_share_of_the_draws(shares: tuple[int, int, int]) -> None:
    drawn = Counter(kind_of(draw, shares, coupons=True) for draw in range(100))
    kinds = ("purchase", "coupon_purchase", "points_redeem")
    assert {k: drawn[k] for k in kinds} == dict(zip(kinds, shares, strict=True))


def test_a_coupon_purchase_without_codes_left_is_a_purchase() -> None:
    drawn = Counter(kind_of(draw, (70, 20, 10), coupons=False) for draw in range(100))
    assert drawn == {"purchase": 90, "points_redeem": 10}
