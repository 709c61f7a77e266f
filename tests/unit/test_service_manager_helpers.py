"""The pure helpers of the service-card and manager-card services: which package a POS
redemption uses (and which refusal it answers when none may be used), the local day that
keys a manager card's daily total, and the POS answers of stored outcomes."""

from __future__ import annotations

from cardcore.cards.model import Outcome
from cardcore.manager_cards import service as managers
from cardcore.service_cards import model
from cardcore.service_cards.model import Entitlement, EntitlementState, RefundPolicy
from cardcore.service_cards.service import NO_PACKAGE, choose_package

DAY_MS = 86_400_000
NOW = 1_800_000_000_000


def product(code: str, stores: frozenset[str] = frozenset()) -> model.ServiceProduct:
    return model.ServiceProduct(
        code=code, name=code, uses=5, price_fen=1_000, validity_months=1, stores=stores,
        refund_policy=RefundPolicy.PRO_RATA, refund_fee_fen=0, single_use_price_fen=200,
        refund_after_expiry=False,
    )  # fmt: skip


def package(id_: int, code: str = "WASH", *, left: int = 3, expires_in_days: int = 10,
            state: EntitlementState = EntitlementState.ACTIVE) -> Entitlement:  # fmt: skip
    return Entitlement(
        id=id_, product_code=code, uses_total=5, uses_left=left, sold_ms=NOW - DAY_MS,
        expires_ms=NOW + expires_in_days * DAY_MS, price_fen=1_000, state=state,
        refund_terms=model.refund_terms_of(PRODUCTS[code]), stores=PRODUCTS[code].stores,
    )  # fmt: skip


PRODUCTS = {"WASH": product("WASH"), "SPA": product("SPA", frozenset({"S1"}))}


def choose(
    packages: list[Entitlement],
    *,
    store: str = "S1",
    uses: int = 1,
    products: dict[str, model.ServiceProduct] = PRODUCTS,
) -> tuple[int | None, str]:
    chosen, refusal = choose_package(packages, products, store=store, now_ms=NOW, uses=uses)
    return (None if chosen is None else chosen.id), refusal


def test_the_package_expiring_first_that_may_be_used_here_is_chosen() -> None:
    early, late = package(1, expires_in_days=5), package(2, expires_in_days=20)
    assert choose([late, early]) == (1, "")
    # Too few uses left in the earliest: the next one that has enough.
    assert choose([package(1, left=1, expires_in_days=5), late], uses=2) == (2, "")
    # Among several products ("" at the POS), the one expiring first.
    assert choose([late, package(3, "SPA", expires_in_days=3)]) == (3, "")
    # Outside the SPA's store, the WASH package is used.
    assert choose([late, package(3, "SPA", expires_in_days=3)], store="S2") == (2, "")


def test_when_nothing_may_be_used_the_refusal_names_why() -> None:
    assert choose([]) == (None, NO_PACKAGE)
    assert choose([package(1)], products={"SPA": PRODUCTS["SPA"]}) == (None, NO_PACKAGE)
    assert choose([package(1, left=0)]) == (None, model.NO_USES_LEFT)
    assert choose([package(1, left=2)], uses=3) == (None, model.NO_USES_LEFT)
    assert choose([package(1, expires_in_days=-1)]) == (None, model.EXPIRED)
    assert choose([package(1, state=EntitlementState.REFUNDED)]) == (None, model.REFUNDED)
    assert choose([package(3, "SPA")], store="S2") == (None, model.WRONG_STORE)


def test_stored_outcomes_answer_as_the_first_time_and_a_reversed_approval_does_not() -> None:
    def stored(outcome: str, *, reversed_: bool = False) -> dict[str, object]:
        return {"outcome": outcome, "discount_fen": 500, "reversed": reversed_}

    approved = managers._replayed(stored("approved"))
    assert (approved.outcome, approved.discount, approved.replayed) == (
        Outcome.APPROVED, 500, True)  # fmt: skip
    daily = managers._replayed(stored("manager_over_daily"))
    assert (daily.outcome, daily.refusal) == (Outcome.OVER_LIMIT, "manager_over_daily")
    assert managers._replayed(stored("pin_wrong")).outcome is Outcome.PIN_WRONG
    assert managers._replayed(stored("manager_not_manager")).outcome is Outcome.NOT_PERMITTED
    undone = managers._replayed(stored("approved", reversed_=True))
    assert undone.outcome is Outcome.REVERSED_BEFORE_ARRIVAL
