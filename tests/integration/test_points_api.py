"""Points programs, earning rules and a card class's program through the admin API, on
SQLite and PostgreSQL: who may define what (HQ, an entity's HQ, a store's CRM officer within
HQ's grant), every refusal with its stable code, and that a refused request changes nothing.
"""

from __future__ import annotations

from typing import Any

from cardcore.ledger.http import LEDGER_KEY
from cardcore.ledger.model import AssetKind, CreateAsset
from tests.helpers import AdminClient, sql_execute, sql_rows

PROGRAM = {
    "code": "CLUB",
    "name": "Club points",
    "asset": "PTS:CLUB",
    "timezone": "Asia/Shanghai",
    "pending_days": 0,
    "expiry": {"kind": "rolling_months", "months": 12},
    "redeem_points": 100,
    "redeem_fen": 100,
}
RULE = {"code": "BASE", "kind": "base", "points": 1, "per_fen": 100}
TABLES = ("points_programs", "points_rules", "ledger_assets", "card_classes", "org_audit_log",
          "org_grants")  # fmt: skip


async def counts(db_url: str) -> dict[str, Any]:
    out = {}
    for table in TABLES:
        rows = await sql_rows(db_url, f"SELECT * FROM {table}")  # noqa: S608 - our own names
        out[table] = sorted(repr(sorted(r.items())) for r in rows)
    return out


async def program(admin: AdminClient, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = await admin.ok("POST", "/v1/points/programs", json={**PROGRAM, **fields})
    return body


async def points_world(admin: AdminClient) -> dict[str, str]:
    """LE1 (S1, S2), LE2 (S3); program CLUB; tokens of HQ marketing, LE1's marketing, S1's
    and S2's CRM officers, and S1's supervisor."""
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    await program(admin)
    return {
        "hq": await admin.token("hq_marketing"),
        "le1": await admin.token("hq_marketing", "entity", "LE1"),
        "s1": await admin.token("store_crm", "store", "S1"),
        "s2": await admin.token("store_crm", "store", "S2"),
        "sup1": await admin.token("store_supervisor", "store", "S1"),
        "auditor": await admin.token("auditor"),
    }


async def refused(
    admin: AdminClient, db_url: str, method: str, path: str, token: str | None,
    body: Any, status: int, code: str, field: str | None = None,
) -> None:  # fmt: skip
    before = await counts(db_url)
    got, answer = await admin.call(method, path, token, body)
    assert (got, answer["error"]["code"]) == (status, code), answer
    if field is not None:
        assert answer["error"]["field"] == field, answer
    assert await counts(db_url) == before


# --- programs ------------------------------------------------------------------------------


async def test_hq_defines_a_program_with_its_ledger_asset_and_an_audit_row(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    made = await program(admin, tiers={"ladder": [
        {"code": "SILVER", "threshold": 0, "multiplier_pct": 100},
        {"code": "GOLD", "threshold": 5000, "multiplier_pct": 150}]})  # fmt: skip
    assert made["code"] == "CLUB"
    assert made["asset"] == "PTS:CLUB"
    assert made["expiry"] == {"kind": "rolling_months", "months": 12, "month": 12, "day": 31}
    assert made["state"] == "active"
    assert made["negative_policy"] == "debt"
    assert made["tiers"]["ladder"][1]["code"] == "GOLD"
    assert made["tiers"]["period"] == "calendar_year"
    [asset] = await sql_rows(db_url, "SELECT * FROM ledger_assets WHERE code = 'PTS:CLUB'")
    assert (asset["kind"], asset["scale"]) == ("points", 0)
    audit = await sql_rows(
        db_url, "SELECT * FROM org_audit_log WHERE action = 'points_program.create'"
    )
    assert [a["object_id"] for a in audit] == ["CLUB"]
    assert await admin.ok("GET", "/v1/points/programs/CLUB") == made
    listed = await admin.ok("GET", "/v1/points/programs")
    assert [p["code"] for p in listed["items"]] == ["CLUB"]


async def test_bad_programs_are_refused_with_a_stable_code_and_change_nothing(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await program(admin)
    path = "/v1/points/programs"
    cases = [
        ({**PROGRAM, "code": "P2", "asset": "PTS:P2", "timezone": "Mars/Olympus"},
         "points_program_invalid", "timezone"),
        ({**PROGRAM, "code": "P2", "asset": "PTS:P2", "pending_days": 40,
          "expiry": {"kind": "rolling_months", "months": 1}}, "points_program_invalid",
         "pending_days"),
        ({**PROGRAM, "code": "P2", "asset": "PTS:P2",
          "expiry": {"kind": "fixed_date", "months": 0, "month": 2, "day": 30}},
         "points_program_invalid", "expiry.day"),
        ({**PROGRAM, "code": "P2", "asset": "PTS:P2", "tiers": {"ladder": [
            {"code": "A", "threshold": 10, "multiplier_pct": 100},
            {"code": "B", "threshold": 5, "multiplier_pct": 100}]}},
         "points_tiers_invalid", "tiers.tiers[1].threshold"),
        ({**PROGRAM, "code": "P2", "asset": "pts"}, "invalid_value", "asset"),
        ({**PROGRAM, "code": "P2", "asset": "PTS:P2", "redeem_fen": 0}, "invalid_value",
         "redeem_fen"),
        ({**PROGRAM, "code": "P2", "asset": "PTS:P2", "surprise": 1}, "unknown_field",
         "surprise"),
    ]  # fmt: skip
    for body, code, field in cases:
        await refused(admin, db_url, "POST", path, None, body, 400, code, field)
    await refused(admin, db_url, "POST", path, None, PROGRAM, 409, "program_exists", "code")
    await refused(admin, db_url, "POST", path, None, {**PROGRAM, "code": "P3"}, 409,
                  "asset_taken", "asset")  # fmt: skip


async def test_an_asset_the_ledger_holds_for_something_else_is_refused(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    ledger = admin.app[LEDGER_KEY]
    [made] = await ledger.submit([CreateAsset("PTS:OLD", AssetKind.POINTS, 0, "other points")])
    assert made.ok
    await refused(admin, db_url, "POST", "/v1/points/programs", None,
                  {**PROGRAM, "asset": "PTS:OLD"}, 409, "asset_taken", "asset")  # fmt: skip


async def test_only_the_group_defines_and_changes_programs(admin: AdminClient, db_url: str) -> None:
    tokens = await points_world(admin)
    new = {**PROGRAM, "code": "P9", "asset": "PTS:P9"}
    path = "/v1/points/programs"
    await refused(admin, db_url, "POST", path, tokens["s1"], new, 403, "role_forbidden")
    await refused(admin, db_url, "POST", path, tokens["le1"], new, 403, "scope_forbidden")
    await refused(admin, db_url, "POST", path, tokens["auditor"], new, 403, "role_forbidden")
    await refused(admin, db_url, "PATCH", f"{path}/CLUB", tokens["le1"], {"name": "x"}, 403,
                  "scope_forbidden")  # fmt: skip
    await refused(admin, db_url, "PATCH", f"{path}/CLUB", tokens["s1"], {"name": "x"}, 403,
                  "role_forbidden")  # fmt: skip
    for who in ("s1", "s2", "sup1", "le1", "auditor"):
        assert (await admin.ok("GET", f"{path}/CLUB", tokens[who]))["code"] == "CLUB"
    made = await admin.ok("POST", path, tokens["hq"], new)
    assert made["code"] == "P9"


async def test_a_program_changes_within_its_rules_and_keeps_its_code_and_asset(
    admin: AdminClient, db_url: str
) -> None:
    await admin.org("LE1", "S1")
    await program(admin)
    path = "/v1/points/programs/CLUB"
    changed = await admin.ok("PATCH", path, json={"name": "Club", "pending_days": 7,
                                                  "negative_policy": "negative"})  # fmt: skip
    assert (changed["name"], changed["pending_days"], changed["negative_policy"]) == (
        "Club",
        7,
        "negative",
    )
    assert changed["asset"] == "PTS:CLUB"
    await refused(admin, db_url, "PATCH", path, None, {"asset": "PTS:X"}, 400, "unknown_field",
                  "asset")  # fmt: skip
    await refused(admin, db_url, "PATCH", path, None, {"timezone": "Nowhere/City"}, 400,
                  "points_program_invalid", "timezone")  # fmt: skip
    # Its lots' days are read in its zone: a new zone moved their expiry (a review found)
    await refused(admin, db_url, "PATCH", path, None, {"timezone": "America/Los_Angeles"}, 409,
                  "program_timezone_fixed", "timezone")  # fmt: skip
    same = await admin.ok("PATCH", path, json={"timezone": PROGRAM["timezone"]})
    assert same["timezone"] == PROGRAM["timezone"]
    await refused(admin, db_url, "PATCH", path, None, {}, 400, "invalid_value")
    await refused(admin, db_url, "PATCH", "/v1/points/programs/NOPE", None, {"name": "x"}, 404,
                  "program_not_found")  # fmt: skip
    closed = await admin.ok("PATCH", path, json={"state": "closed"})
    assert closed["state"] == "closed"
    audit = await sql_rows(
        db_url, "SELECT * FROM org_audit_log WHERE action = 'points_program.update'"
    )
    assert len(audit) == 3


# --- earning rules -----------------------------------------------------------------------------


async def test_hq_defines_group_entity_and_store_rules(admin: AdminClient, db_url: str) -> None:
    tokens = await points_world(admin)
    path = "/v1/points/programs/CLUB/rules"
    group = await admin.ok("POST", path, tokens["hq"], RULE)
    assert (group["legal_entity"], group["store"], group["state"]) == ("", "", "active")
    assert (group["points"], group["per_fen"], group["kind"]) == (1, 100, "base")
    entity = await admin.ok("POST", path, tokens["le1"], {**RULE, "code": "LE1X",
                            "legal_entity": "LE1", "stores": ["S2"]})  # fmt: skip
    assert (entity["legal_entity"], entity["store"]) == ("LE1", "")
    store = await admin.ok("POST", path, tokens["hq"], {**RULE, "code": "S1X", "store": "S1"})
    assert (store["legal_entity"], store["store"]) == ("LE1", "S1")
    await refused(admin, db_url, "POST", path, tokens["le1"], {**RULE, "code": "G2"}, 403,
                  "scope_forbidden")  # fmt: skip
    await refused(admin, db_url, "POST", path, tokens["le1"], {**RULE, "code": "S3X",
                  "store": "S3"}, 403, "scope_forbidden")  # fmt: skip
    await refused(admin, db_url, "POST", path, tokens["le1"], {**RULE, "code": "LE1Y",
                  "legal_entity": "LE1", "stores": ["S3"]}, 403, "scope_forbidden",
                  "stores")  # fmt: skip
    await refused(admin, db_url, "POST", path, None, RULE, 409, "rule_exists", "code")
    await refused(admin, db_url, "POST", "/v1/points/programs/NOPE/rules", None, RULE, 404,
                  "program_not_found", "program")  # fmt: skip
    await refused(admin, db_url, "POST", path, None, {**RULE, "code": "X", "store": "S9"}, 404,
                  "store_not_found", "store")  # fmt: skip
    await refused(admin, db_url, "POST", path, None, {**RULE, "code": "X", "store": "S1",
                  "legal_entity": "LE2"}, 400, "store_not_in_entity", "store")  # fmt: skip
    audit = await sql_rows(db_url, "SELECT * FROM org_audit_log WHERE action = "
                           "'points_rule.create' ORDER BY id")  # fmt: skip
    assert [(a["object_id"], a["entity"], a["store"]) for a in audit] == [
        ("CLUB/BASE", "", ""),
        ("CLUB/LE1X", "LE1", ""),
        ("CLUB/S1X", "LE1", "S1"),
    ]


async def test_bad_rules_are_refused_with_the_field_at_fault(
    admin: AdminClient, db_url: str
) -> None:
    await points_world(admin)
    path = "/v1/points/programs/CLUB/rules"
    cases = [
        ({**RULE, "points": 0}, "points_rule_invalid", "points"),
        ({**RULE, "per_fen": 0}, "points_rule_invalid", "per_fen"),
        ({**RULE, "kind": "category"}, "points_rule_invalid", "departments"),
        ({**RULE, "departments": ["FOOD"]}, "points_rule_invalid", "departments"),
        ({**RULE, "valid_from": "2026-05-01", "valid_to": "2026-04-01"}, "points_rule_invalid",
         "valid_to"),
        ({**RULE, "valid_from": "2026-02-30"}, "points_rule_invalid", "valid_from"),
        ({**RULE, "window": ["25:00", "10:00"]}, "points_rule_invalid", "window"),
        ({**RULE, "window": ["10:00", "10:00"]}, "points_rule_invalid", "window"),
        ({**RULE, "kind": "bonus", "points": 0, "per_fen": 100}, "points_rule_invalid", "points"),
        ({**RULE, "weekdays": [0]}, "invalid_value", "weekdays.0"),
        ({**RULE, "code": "bad code"}, "invalid_value", "code"),
    ]  # fmt: skip
    for body, code, field in cases:
        await refused(admin, db_url, "POST", path, None, body, 400, code, field)


async def test_a_store_officer_defines_only_its_own_stores_rules_and_only_while_granted(
    admin: AdminClient, db_url: str
) -> None:
    tokens = await points_world(admin)
    path = "/v1/points/programs/CLUB/rules"
    mine = {**RULE, "code": "S1R", "store": "S1"}
    await refused(admin, db_url, "POST", path, tokens["s1"], mine, 403, "not_granted")
    await admin.ok("POST", "/v1/grants", json={"store": "S2", "function": "points"})
    await refused(admin, db_url, "POST", path, tokens["s1"], mine, 403, "not_granted")
    grant = await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "points"})
    made = await admin.ok("POST", path, tokens["s1"], mine)
    assert (made["legal_entity"], made["store"]) == ("LE1", "S1")
    for body, code in [
        ({**RULE, "code": "S2R", "store": "S2"}, "scope_forbidden"),  # another store
        ({**RULE, "code": "GR"}, "scope_forbidden"),  # the group's
        ({**RULE, "code": "ER", "legal_entity": "LE1"}, "scope_forbidden"),  # the entity's
        ({**mine, "code": "S1B", "stores": ["S1", "S2"]}, "scope_forbidden"),  # names S2
    ]:
        await refused(admin, db_url, "POST", path, tokens["s1"], body, 403, code)
    await refused(admin, db_url, "POST", path, tokens["sup1"], {**mine, "code": "SUP"}, 403,
                  "role_forbidden")  # fmt: skip
    changed = await admin.ok("PATCH", f"{path}/S1R", tokens["s1"], {"points": 2})
    assert changed["points"] == 2
    await refused(admin, db_url, "PATCH", f"{path}/S1R", tokens["s2"], {"points": 3}, 403,
                  "scope_forbidden")  # fmt: skip
    await refused(admin, db_url, "PATCH", f"{path}/S1R", tokens["s1"],
                  {"stores": ["S2"]}, 403, "scope_forbidden", "stores")  # fmt: skip
    await admin.ok("DELETE", f"/v1/grants/{grant['id']}")
    await refused(admin, db_url, "PATCH", f"{path}/S1R", tokens["s1"], {"points": 3}, 403,
                  "not_granted")  # fmt: skip
    # HQ still may.
    assert (await admin.ok("PATCH", f"{path}/S1R", tokens["hq"], {"state": "retired"}))[
        "state"
    ] == "retired"


async def test_a_store_officer_sees_the_groups_its_entitys_and_its_stores_rules_only(
    admin: AdminClient,
) -> None:
    tokens = await points_world(admin)
    path = "/v1/points/programs/CLUB/rules"
    await admin.ok("POST", path, json=RULE)
    await admin.ok("POST", path, json={**RULE, "code": "LE1X", "legal_entity": "LE1"})
    await admin.ok("POST", path, json={**RULE, "code": "LE2X", "legal_entity": "LE2"})
    await admin.ok("POST", path, json={**RULE, "code": "S1X", "store": "S1"})
    await admin.ok("POST", path, json={**RULE, "code": "S2X", "store": "S2"})

    async def codes(token: str | None) -> list[str]:
        return [r["code"] for r in (await admin.ok("GET", path, token))["items"]]

    assert await codes(None) == ["BASE", "LE1X", "LE2X", "S1X", "S2X"]
    assert await codes(tokens["le1"]) == ["BASE", "LE1X", "S1X", "S2X"]
    assert await codes(tokens["s1"]) == ["BASE", "LE1X", "S1X"]
    assert await codes(tokens["s2"]) == ["BASE", "LE1X", "S2X"]
    assert (await admin.ok("GET", f"{path}/S1X", tokens["s1"]))["store"] == "S1"
    assert (await admin.ok("GET", f"{path}/BASE", tokens["s2"]))["store"] == ""
    status, answer = await admin.call("GET", f"{path}/S1X", tokens["s2"])
    assert (status, answer["error"]["code"]) == (403, "scope_forbidden")
    status, answer = await admin.call("GET", f"{path}/NOPE")
    assert (status, answer["error"]["code"]) == (404, "rule_not_found")


async def test_a_store_officer_finds_its_rules_behind_hundreds_it_cannot_see(
    admin: AdminClient, db_url: str
) -> None:
    """The list read one chunk of rules and filtered it by scope: another store's rules
    (retired ones have no bound) sorting first left an officer a short page with no next."""
    tokens = await points_world(admin)
    path = "/v1/points/programs/CLUB/rules"
    await admin.ok("POST", path, json={**RULE, "code": "S2X", "store": "S2"})
    await admin.ok("POST", path, json={**RULE, "code": "S1X", "store": "S1"})
    [row] = await sql_rows(db_url, "SELECT * FROM points_rules WHERE code = 'S2X'")
    values = ", ".join(
        f"('CLUB', 'AA{i:04d}', '{row['legal_entity']}', 'S2', '{row['definition']}', 'retired',"
        f" {row['created_at_ms']}, {row['updated_at_ms']})"
        for i in range(300)
    )
    await sql_execute(
        db_url,
        "INSERT INTO points_rules (program, code, legal_entity, store, definition, state,"  # noqa: S608 - the test's own values
        f" created_at_ms, updated_at_ms) VALUES {values}",
    )
    listed = await admin.ok("GET", path, tokens["s1"])
    assert ([r["code"] for r in listed["items"]], listed["next_after"]) == (["S1X"], None)
    await admin.ok("POST", path, json={**RULE, "code": "S1Y", "store": "S1"})
    first = await admin.ok("GET", path, tokens["s1"], limit=1)
    rest = await admin.ok("GET", path, tokens["s1"], after=first["next_after"])
    assert [r["code"] for r in first["items"] + rest["items"]] == ["S1X", "S1Y"]


async def test_a_program_holds_at_most_its_limit_of_active_rules(
    admin: AdminClient, db_url: str
) -> None:
    from cardcore import limits  # noqa: PLC0415 - only this test needs it

    await points_world(admin)
    path = "/v1/points/programs/CLUB/rules"
    for i in range(limits.POINTS_RULES_PER_PROGRAM_MAX):
        await admin.ok("POST", path, json={**RULE, "code": f"R{i:03d}"})
    await refused(admin, db_url, "POST", path, None, {**RULE, "code": "ONEMORE"}, 409,
                  "too_many_rules")  # fmt: skip
    await admin.ok("PATCH", f"{path}/R000", json={"state": "retired"})
    await admin.ok("POST", path, json={**RULE, "code": "ONEMORE"})
    await refused(admin, db_url, "PATCH", f"{path}/R000", None, {"state": "active"}, 409,
                  "too_many_rules")  # fmt: skip


# --- a card class's program ------------------------------------------------------------------


async def test_a_card_class_names_an_existing_program_or_none(
    admin: AdminClient, db_url: str
) -> None:
    await points_world(admin)
    path = "/v1/card-classes"
    made = await admin.ok("POST", path, json={"code": "ORD", "name": "Ordinary", "named": True,
                                              "points_program": "CLUB"})  # fmt: skip
    assert made["points_program"] == "CLUB"
    plain = await admin.ok("POST", path, json={"code": "BEAR", "name": "Bearer", "named": False})
    assert plain["points_program"] == ""
    await refused(admin, db_url, "POST", path, None, {"code": "X", "name": "x", "named": True,
                  "points_program": "NOPE"}, 404, "program_not_found",
                  "points_program")  # fmt: skip
    await refused(admin, db_url, "PATCH", f"{path}/BEAR", None, {"points_program": "NOPE"}, 404,
                  "program_not_found", "points_program")  # fmt: skip
    await refused(admin, db_url, "PATCH", f"{path}/BEAR", None, {"points_program": "a b"}, 400,
                  "invalid_value", "points_program")  # fmt: skip
    assert (await admin.ok("PATCH", f"{path}/BEAR", json={"points_program": "CLUB"}))[
        "points_program"
    ] == "CLUB"
    assert (await admin.ok("PATCH", f"{path}/ORD", json={"points_program": ""}))[
        "points_program"
    ] == ""
