"""Issuing coupons to a spend segment (`{"spend_at_least", "program", "since", "until"}`),
on SQLite and PostgreSQL, through the whole host app: the points earnings of the program
on the program's local days since..until (both included), less returns, summed over all of a
member's cards, at least the bound; only active members of the campaign's legal entity (a
store officer: its store's); the segment's size bound; and every bad input refused with its
stable code, nothing issued.
"""

from __future__ import annotations

import datetime
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest

from cardcore import limits
from cardcore.cards.http import POS_KEY
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult
from cardcore.cards.pos import PosService
from cardcore.localtime import day_start_ms, local_date
from cardcore.points.http import POINTS_KEY
from tests import logscan
from tests.helpers import AdminClient, sql_execute
from tests.integration.test_coupons_admin import campaign, count, counts
from tests.integration.test_points_api import PROGRAM, RULE

TZ = "Asia/Shanghai"
HOUR_MS, MINUTE_MS = 3_600_000, 60_000
BOUND = 10_000  # fen
_stans = itertools.count(1)
_tids = itertools.count(1)
_mobiles = itertools.count(1)

# The period: seven local days ending ten days ago (lots earned then are still live).
UNTIL = local_date(TZ, int(time.time() * 1000)) - datetime.timedelta(days=10)
SINCE = UNTIL - datetime.timedelta(days=6)
ONE_DAY = datetime.timedelta(days=1)
IN_PERIOD = day_start_ms(TZ, SINCE) + 12 * HOUR_MS  # noon on the first day
FIRST_MINUTES = day_start_ms(TZ, SINCE) + 5 * MINUTE_MS  # 00:05 on `since`
DAY_BEFORE = day_start_ms(TZ, SINCE) - 20 * MINUTE_MS  # 23:40 the day before `since`
LAST_EVENING = day_start_ms(TZ, UNTIL) + 23 * HOUR_MS + 30 * MINUTE_MS  # 23:30 on `until`
DAY_AFTER = day_start_ms(TZ, UNTIL + ONE_DAY) + 10 * MINUTE_MS  # 00:10 the day after `until`


def fixed(ms: int) -> Callable[[], int]:
    return lambda: ms


def segment(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "spend_at_least": BOUND,
        "program": "CLUB",
        "since": SINCE.isoformat(),
        "until": UNTIL.isoformat(),
    }
    body.update(changes)
    return {"segment": {k: v for k, v in body.items() if v is not None}}


class World:
    """LE1 (S1, S2) and LE2 (S3), a terminal in each store; program CLUB (Asia/Shanghai, 1
    point per CNY) with card class PTS, program OTHER with class OTH."""

    def __init__(self, admin: AdminClient) -> None:
        self.admin = admin
        self.pos: PosService = admin.app[POS_KEY]
        self.tids: dict[str, str] = {}

    async def make(self) -> World:
        admin = self.admin
        await admin.org("LE1", "S1", "S2")
        await admin.org("LE2", "S3")
        other = {**PROGRAM, "code": "OTHER", "name": "Other points", "asset": "PTS:OTHER"}
        for program, klass in ((PROGRAM, "PTS"), (other, "OTH")):
            await admin.ok("POST", "/v1/points/programs", json=program)
            await admin.ok("POST", f"/v1/points/programs/{program['code']}/rules", json=RULE)
            await admin.ok("POST", "/v1/card-classes", json={
                "code": klass, "name": klass, "named": True,
                "points_program": program["code"]})  # fmt: skip
        for store in ("S1", "S2", "S3"):
            await admin.ok("POST", "/v1/grants", json={"store": store, "function": "stored_value"})
            n = next(_tids)
            tid = f"G{n:07d}"
            answer = await admin.ok("POST", "/v1/terminals", json={
                "tid": tid, "mid": f"M{n:014d}", "store": store})  # fmt: skip
            logscan.SCAN.remember("a terminal master key", answer["tmk"])
            self.tids[store] = tid
        return self

    async def member(self, store: str = "S1") -> int:
        made = await self.admin.ok("POST", "/v1/members", json={
            "mobile": f"136{next(_mobiles):08d}", "name": "Li Lei",
            "home_store": store})  # fmt: skip
        return int(made["id"])

    async def card(self, member: int, store: str = "S1", klass: str = "PTS") -> dict[str, Any]:
        card: dict[str, Any] = await self.admin.ok("POST", "/v1/cards", json={
            "class_code": klass, "store": store, "member_id": member})  # fmt: skip
        return card

    async def one(self, request: PosRequest, at_ms: int) -> PosResult:
        self.admin.app[POINTS_KEY].clock_ms = fixed(at_ms)
        [answer] = await self.pos.handle([request])
        assert answer.outcome is Outcome.APPROVED, answer
        return answer

    async def earn(self, card: dict[str, Any], fen: int, at_ms: int, store: str = "S1") -> str:
        """A purchase paid some other way that earns points (900000); its RRN."""
        request = PosRequest(kind=Kind.POINTS_EARN, terminal=self.tids[store], batch="000001",
                             stan=f"{next(_stans):06d}", card=card["pan"], amount=fen)  # fmt: skip
        answer = await self.one(request, at_ms)
        assert answer.points == fen // 100
        return answer.rrn

    async def give_back(self, card: dict[str, Any], fen: int, rrn: str, at_ms: int) -> None:
        """A return of goods of an earning (980000): its spend is `fen` less."""
        request = PosRequest(kind=Kind.POINTS_RETURN, terminal=self.tids["S1"], batch="000001",
                             stan=f"{next(_stans):06d}", card=card["pan"], amount=fen,
                             rrn=rrn)  # fmt: skip
        await self.one(request, at_ms)


async def issued(admin: AdminClient, body: dict[str, Any], token: str | None = None,
                 code: str = "TENOFF") -> list[int]:  # fmt: skip
    made = await admin.ok("POST", f"/v1/coupon-campaigns/{code}/issues", token, body)
    return sorted(c["member_id"] for c in made["codes"])


async def test_a_spend_segment_takes_the_members_whose_program_spend_in_the_local_days_reaches_it(
    admin: AdminClient, db_url: str
) -> None:
    world = await World(admin).make()
    await campaign(admin, holder_only=True)
    edges = await world.member()  # 00:05 on since and 23:30 on until: in
    await world.earn(await world.card(edges), 6_000, FIRST_MINUTES)
    await world.earn(await world.card(edges), 4_000, LAST_EVENING)
    late = await world.member()  # 00:10 the day after until (16:10 UTC on until): not in
    late_card = await world.card(late)
    await world.earn(late_card, 9_000, LAST_EVENING)
    await world.earn(late_card, 5_000, DAY_AFTER)
    early = await world.member()  # 23:40 the day before since: not in
    early_card = await world.card(early)
    await world.earn(early_card, 5_000, DAY_BEFORE)
    await world.earn(early_card, 6_000, IN_PERIOD)
    two_cards = await world.member()  # 6,000 + 5,000 on two cards: in
    await world.earn(await world.card(two_cards), 6_000, IN_PERIOD)
    await world.earn(await world.card(two_cards, "S2"), 5_000, IN_PERIOD, "S2")
    returned = await world.member()  # 12,000 less a return of 3,000: not in
    returned_card = await world.card(returned)
    rrn = await world.earn(returned_card, 12_000, IN_PERIOD)
    await world.give_back(returned_card, 3_000, rrn, IN_PERIOD + HOUR_MS)
    other_program = await world.member()  # 20,000 in program OTHER: not in
    await world.earn(await world.card(other_program, klass="OTH"), 20_000, IN_PERIOD)
    replaced = await world.member()  # 6,000 on a card since replaced: its account counts once
    old = await world.card(replaced)
    await world.earn(old, 6_000, IN_PERIOD)
    await admin.ok("POST", f"/v1/cards/{old['id']}/lost")
    new = await admin.ok("POST", f"/v1/cards/{old['id']}/replace")
    assert new["account_id"] == old["account_id"]
    other_entity = await world.member("S3")  # LE2's member: not in
    await world.earn(await world.card(other_entity, "S3"), 20_000, IN_PERIOD, "S3")
    deleted = await world.member()  # no longer active: not in
    await world.earn(await world.card(deleted), 20_000, IN_PERIOD)
    await sql_execute(db_url, f"UPDATE members SET state = 'deleted' WHERE id = {deleted}")  # noqa: S608 - an id the test made

    made = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/issues",
                          json={**segment(), "key": "big-spenders"})  # fmt: skip
    assert sorted(c["member_id"] for c in made["codes"]) == sorted([edges, two_cards])
    assert (made["count"], made["source"], made["replayed"]) == (2, "member", False)
    again = await admin.ok("POST", "/v1/coupon-campaigns/TENOFF/issues",
                           json={**segment(), "key": "big-spenders"})  # fmt: skip
    assert (again["replayed"], again["batch"]) == (True, made["batch"])
    assert await count(db_url, "coupon_codes") == 2
    # The bound is inclusive, and a lower one reaches further.
    assert await issued(admin, segment(spend_at_least=9_000)) == sorted(
        [edges, late, two_cards, returned]
    )
    assert await issued(admin, segment(spend_at_least=6_000)) == sorted(
        [edges, late, early, two_cards, returned, replaced]
    )
    # A day wider on either side takes in the earnings at its edges.
    wider = segment(since=(SINCE - ONE_DAY).isoformat(), until=(UNTIL + ONE_DAY).isoformat())
    assert await issued(admin, wider) == sorted([edges, late, early, two_cards])
    assert await issued(admin, segment(program="OTHER", spend_at_least=1)) == [other_program]
    before = await counts(db_url)
    # 20,000 each: in program OTHER, of LE2, no longer active; nobody else spent as much.
    got, body = await admin.call("POST", "/v1/coupon-campaigns/TENOFF/issues",
                                 json=segment(spend_at_least=20_000))  # fmt: skip
    assert (got, body["error"]["code"]) == (400, "no_members")
    assert await counts(db_url) == before


async def test_a_store_officers_spend_segment_takes_its_own_stores_members_only(
    admin: AdminClient, db_url: str
) -> None:
    world = await World(admin).make()
    await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "coupon"})
    crm = await admin.token("store_crm", "store", "S1")
    await campaign(admin, "MINE", store="S1")
    ours = await world.member("S1")
    await world.earn(await world.card(ours), 10_000, IN_PERIOD, "S2")  # spent in S2: counts
    theirs = await world.member("S2")
    await world.earn(await world.card(theirs, "S2"), 10_000, IN_PERIOD)
    assert await issued(admin, segment(), crm, "MINE") == [ours]
    assert await issued(admin, segment(), None, "MINE") == [ours]  # HQ, for S1's campaign
    await campaign(admin, "HQ")
    assert await issued(admin, segment(), None, "HQ") == sorted([ours, theirs])
    before = await counts(db_url)
    got, body = await admin.call("POST", "/v1/coupon-campaigns/HQ/issues", crm, segment())
    assert (got, body["error"]["code"]) == (403, "scope_forbidden")
    assert await counts(db_url) == before


async def test_a_spend_segment_over_the_most_members_is_refused_and_issues_nothing(
    admin: AdminClient, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = await World(admin).make()
    await campaign(admin)
    spenders = [await world.member() for _ in range(3)]
    for spender in spenders:
        await world.earn(await world.card(spender), BOUND, IN_PERIOD)
    monkeypatch.setattr(limits, "COUPON_ISSUE_MEMBERS_MAX", 2)
    before = await counts(db_url)
    got, body = await admin.call("POST", "/v1/coupon-campaigns/TENOFF/issues", json=segment())
    assert (got, body["error"]["code"], body["error"]["field"]) == (
        400, "segment_too_large", "segment")  # fmt: skip
    assert await counts(db_url) == before
    monkeypatch.setattr(limits, "COUPON_ISSUE_MEMBERS_MAX", 3)
    assert await issued(admin, segment()) == spenders


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (segment(since=UNTIL.isoformat(), until=SINCE.isoformat()), 400, "invalid_value",
         "segment.until"),
        (segment(since=(UNTIL - datetime.timedelta(days=366)).isoformat()), 400,
         "invalid_value", "segment.until"),
        (segment(program="NOPE"), 404, "program_not_found", "segment.program"),
        (segment(spend_at_least=0), 400, "invalid_value", "segment.spend_at_least"),
        (segment(spend_at_least=-5), 400, "invalid_value", "segment.spend_at_least"),
        (segment(spend_at_least="10000"), 400, "wrong_type", "segment.spend_at_least"),
        (segment(spend_at_least=100.0), 400, "wrong_type", "segment.spend_at_least"),
        (segment(since="2025/01/01"), 400, "invalid_value", "segment.since"),
        (segment(until="20250101"), 400, "invalid_value", "segment.until"),
        (segment(since="2025-02-29", until="2025-03-01"), 400, "invalid_value",
         "segment.since"),
        (segment(since="2024-04-01", until="2024-04-31"), 400, "invalid_value",
         "segment.until"),
        (segment(until=None), 400, "invalid_value", "segment"),  # one of the three forms
        (segment(extra=1), 400, "invalid_value", "segment"),
        (segment(card_class="PTS"), 400, "invalid_value", "segment"),
        (segment(program="BAD CODE"), 400, "invalid_value", "segment.program"),
        # Dates far from any earning: refused, never a day number out of range (a 500).
        (segment(since="0001-01-01", until="0001-01-02"), 400, "invalid_value", "segment.since"),
        (segment(since="9999-12-30", until="9999-12-31"), 400, "invalid_value", "segment.since"),
    ],
)  # fmt: skip
async def test_a_bad_spend_segment_is_refused_with_its_code_and_issues_nothing(
    admin: AdminClient, db_url: str, body: dict[str, Any], status: int, code: str, field: str
) -> None:
    world = await World(admin).make()
    await campaign(admin)
    spender = await world.member()
    await world.earn(await world.card(spender), 50_000, IN_PERIOD)
    before = await counts(db_url)
    got, answer = await admin.call("POST", "/v1/coupon-campaigns/TENOFF/issues", json=body)
    assert (got, answer["error"]["code"], answer["error"]["field"]) == (status, code, field)
    assert await counts(db_url) == before


async def test_a_period_of_the_most_days_is_taken_and_the_document_shows_the_form(
    admin: AdminClient,
) -> None:
    world = await World(admin).make()
    await campaign(admin)
    spender = await world.member()
    await world.earn(await world.card(spender), BOUND, IN_PERIOD)
    days = limits.COUPON_SEGMENT_DAYS_MAX
    longest = segment(since=(UNTIL - datetime.timedelta(days=days - 1)).isoformat())
    assert await issued(admin, longest) == [spender]
    document = await admin.ok("GET", "/v1/openapi.json", "")
    operation = document["paths"]["/v1/coupon-campaigns/{code}/issues"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    forms = schema["properties"]["segment"]["oneOf"]
    assert [sorted(f["required"]) for f in forms] == [
        ["card_class"], ["tier"], ["program", "since", "spend_at_least", "until"]]  # fmt: skip
    assert all(f["additionalProperties"] is False for f in forms)
