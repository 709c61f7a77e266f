"""The pure helpers of the coupon service: a campaign's stored definition, the spellings a
typed code may have, a code's status at the POS, refusals -> POS outcomes, and what a resend
under a stored POS key is answered. No I/O."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest

from cardcore.cards.model import Kind, Outcome, PosRequest
from cardcore.coupons import model, schema
from cardcore.coupons.model import Campaign, CampaignState, CodeStatus, CouponKind
from cardcore.coupons.service import (
    CouponService,
    campaign_of,
    candidates,
    code_view,
    definition_of,
    face_value,
    outcome_of,
    replay,
    reward_spend_of,
    same_code,
    spellings,
    status_of,
)
from cardcore.org.model import Refused

CODE = model.new_code(lambda n: bytes(range(n)))


def a_campaign(**extra: Any) -> Campaign:
    fields: dict[str, Any] = {"code": "C1", "name": "Ten off", "kind": CouponKind.AMOUNT_OFF}
    fields.update(valid_from_ms=1_000, valid_to_ms=2_000, value_fen=500)
    fields.update(extra)
    return Campaign(**fields)


def test_a_stored_definition_reads_back_as_the_same_campaign() -> None:
    c = a_campaign(
        kind=CouponKind.PERCENT_OFF, value_fen=0, percent_bp=1_500, cap_fen=800,
        stores=("S1", "S2"), departments=("FOOD",), holder_only=True,
        change_rule=model.ChangeRule.REFUSE, supplier_share_bp=2_000, store_share_bp=8_000,
        supplier_id="SUP",
    )  # fmt: skip
    row = {"code": "C1", "state": "active", "definition": definition_of(c, 12_000)}
    assert campaign_of(row) == dataclasses.replace(c, state=CampaignState.ACTIVE)
    assert reward_spend_of(row) == 12_000
    assert face_value(c) == 800
    assert face_value(a_campaign()) == 500


def test_a_typed_code_is_read_forgivingly_and_a_partner_code_as_it_is() -> None:
    typed = " " + model.display(CODE).lower() + " "
    assert candidates(typed)[0] == CODE
    assert candidates("partner-0001") == ["PARTNER-0001"]
    for bad in ("ab", "with space!", "x" * 100):
        with pytest.raises(Refused) as caught:
            candidates(bad)
        assert caught.value.code == "coupon_code_malformed"


def test_a_lapsed_reservation_is_issued_again() -> None:
    row = {"state": "reserved", "reserved_until_ms": 5_000}
    assert status_of(row, 4_999) is CodeStatus.RESERVED
    assert status_of(row, 5_000) is CodeStatus.ISSUED
    assert status_of({"state": "redeemed", "reserved_until_ms": None}, 0) is CodeStatus.REDEEMED


def test_a_code_of_an_ended_campaign_shows_expired() -> None:
    row = {"code": CODE, "campaign": "C1", "state": "issued", "source": "generated",
           "member_id": None, "valid_from_ms": 1_000, "valid_to_ms": 2_000,
           "reserved_until_ms": None, "redeemed_at_ms": None, "issued_at_ms": 1_000}  # fmt: skip
    assert code_view(row, a_campaign(state=CampaignState.ACTIVE), 1_500)["state"] == "issued"
    assert code_view(row, a_campaign(state=CampaignState.ACTIVE), 2_000)["state"] == "expired"
    assert code_view(row, a_campaign(state=CampaignState.ENDED), 1_500)["state"] == "expired"


def test_a_code_shows_its_campaigns_validity_not_the_copy_it_was_issued_with() -> None:
    """A draft's validity may change after codes were issued: the till judges the campaign's,
    so a lookup shows the campaign's."""
    row = {"code": CODE, "campaign": "C1", "state": "issued", "source": "generated",
           "member_id": None, "valid_from_ms": 1_000, "valid_to_ms": 2_000,
           "reserved_until_ms": None, "redeemed_at_ms": None, "issued_at_ms": 1_000}  # fmt: skip
    moved = a_campaign(state=CampaignState.ACTIVE, valid_from_ms=500, valid_to_ms=3_000)
    view = code_view(row, moved, 2_500)
    assert (view["valid_from_ms"], view["valid_to_ms"], view["state"]) == (500, 3_000, "issued")


def test_an_imported_codes_spellings_cover_every_code_candidates_finds_for_it() -> None:
    """What an import looks up: the code and its normalised form, which hold every stored
    spelling a cashier typing the code as printed may find."""
    for imported in (model.display(CODE), "PARTNER-0001", "oil-2024", CODE):
        code = model.check_imported(imported)
        assert set(candidates(code)) <= set(spellings(code)), imported
    assert spellings(model.display(CODE)) == sorted({CODE, model.display(CODE)})
    assert spellings("OIL-2024") == ["0112024", "OIL-2024"]
    assert spellings(CODE) == [CODE]


@pytest.mark.parametrize(
    ("refusal", "campaign_state", "outcome"),
    [
        ("coupon_not_found", "", Outcome.COUPON_UNKNOWN),
        ("coupon_code_malformed", "", Outcome.COUPON_UNKNOWN),
        ("coupon_qr_malformed", "", Outcome.COUPON_UNKNOWN),
        ("coupon_qr_signature", "", Outcome.COUPON_UNKNOWN),
        ("coupon_used", "", Outcome.COUPON_USED),
        ("coupon_reserved", "", Outcome.COUPON_USED),
        ("coupon_expired", "", Outcome.COUPON_EXPIRED),
        ("coupon_not_started", "", Outcome.COUPON_EXPIRED),
        ("coupon_inactive", "paused", Outcome.COUPON_EXPIRED),
        ("coupon_inactive", "active", Outcome.NOT_PERMITTED),  # the code was voided
        ("coupon_inactive", "draft", Outcome.NOT_PERMITTED),
        ("coupon_budget_spent", "active", Outcome.OVER_LIMIT),
        ("coupon_min_spend", "active", Outcome.NOT_PERMITTED),
        ("coupon_not_holder", "active", Outcome.NOT_PERMITTED),
    ],
)
def test_each_refusal_has_its_pos_outcome(
    refusal: str, campaign_state: str, outcome: Outcome
) -> None:
    assert outcome_of(refusal, campaign_state) is outcome


def test_a_resend_gets_the_stored_answer_never_an_approval_after_a_reversal() -> None:
    row = {"code": CODE, "campaign": "C1", "state": "redeemed", "discount_fen": 500,
           "forfeited_fen": 100}  # fmt: skip
    again = PosRequest(Kind.COUPON_REDEEM, "T1", coupon=model.display(CODE))
    answer = replay(row, again)
    assert (answer.outcome, answer.discount, answer.forfeited, answer.replayed) == (
        Outcome.APPROVED, 500, 100, True)  # fmt: skip
    other = replay(row, PosRequest(Kind.COUPON_REDEEM, "T1", coupon="PARTNER-1"))
    assert other.outcome is Outcome.DUPLICATE_MISMATCH
    for state in ("released", "reversed"):
        gone = replay({**row, "state": state}, again)
        assert (gone.outcome, gone.replayed) == (Outcome.REVERSED_BEFORE_ARRIVAL, True)
    assert same_code(row, "")  # a request that names no code (a confirmation, a reversal)
    assert not same_code(row, "v1|not a qr")


async def test_holds_that_read_two_budgets_of_one_campaign_never_share_a_statement() -> None:
    """The campaign changed between two requests' reads: each hold is judged against the
    budget it read, so the second runs alone, after the first's statement."""
    statements: list[list[str]] = []

    class Records:
        postgres = True

        async def statement_rows(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
            statements.append(list(args[0]))
            return [{"code": 1, "campaign": 1, "added": 1} for _ in args[0]]

    service = CouponService(cast(Any, Records()), cast(Any, None), cast(Any, None))

    def hold(key: str, code: str, budget: int) -> schema.Hold:
        redemption: dict[str, Any] = {c.name: None for c in schema.coupon_redemptions.c}
        redemption |= {"key": key, "code": code}
        values = {"state": "redeemed", "reserved_key": None, "reserved_until_ms": None,
                  "redeemed_key": key, "redeemed_at_ms": 5, "version": ("+", 1)}  # fmt: skip
        return schema.Hold(values, redemption, schema.Counted("C1", budget, 0, 100, 100, 0))

    got = await service._holds_together(
        [hold("t:1", "K1", 0), hold("t:2", "K2", 500), hold("t:3", "K3", 0)]
    )
    assert statements == [["K1", "K3"], ["K2"]]
    assert got == [{"code": 1, "campaign": 1, "added": 1}] * 3
