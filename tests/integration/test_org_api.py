"""Organization, staff, tokens, grants and the audit log over the admin API (SQLite and
PostgreSQL)."""

from __future__ import annotations

import asyncio
from typing import Any

from cardcore import limits
from cardcore.org.http import ORG_KEY
from tests.helpers import AdminClient, sql_execute


async def test_openapi_document_is_served_without_a_token(admin: AdminClient) -> None:
    status, body = await admin.call("GET", "/v1/openapi.json", token="")
    assert status == 200
    assert body["openapi"].startswith("3.")
    assert "/v1/stores" in body["paths"]


async def test_every_admin_route_refuses_a_missing_or_unknown_token(admin: AdminClient) -> None:
    for token in ("", "cc_not-a-token", "garbage"):
        status, body = await admin.call("GET", "/v1/stores", token=token)
        assert (status, body["error"]["code"]) == (401, "unauthorized")


async def test_hq_admin_builds_the_group_and_every_change_is_audited(admin: AdminClient) -> None:
    await admin.org("LE1", "S1", "S2")
    await admin.org("LE2", "S3")
    stores = await admin.ok("GET", "/v1/stores")
    assert [s["id"] for s in stores["items"]] == ["S1", "S2", "S3"]
    only_le2 = await admin.ok("GET", "/v1/stores", legal_entity="LE2")
    assert [s["id"] for s in only_le2["items"]] == ["S3"]
    page = await admin.ok("GET", "/v1/stores", limit=2)
    assert page["next_after"] == "S2"
    rest = await admin.ok("GET", "/v1/stores", limit=2, after="S2")
    assert ([s["id"] for s in rest["items"]], rest["next_after"]) == (["S3"], None)
    audit = await admin.ok("GET", "/v1/audit", object_kind="store")
    assert [a["object_id"] for a in audit["items"]] == ["S1", "S2", "S3"]
    assert audit["items"][0]["user"] == "root"
    assert audit["items"][0]["before"] is None
    assert audit["items"][0]["after"]["legal_entity"] == "LE1"


async def test_store_officer_sees_only_its_store_and_cannot_change_the_organization(
    admin: AdminClient,
) -> None:
    await admin.org("LE1", "S1", "S2")
    officer = await admin.token("store_crm", "store", "S1")
    listed = await admin.ok("GET", "/v1/stores", officer)
    assert [s["id"] for s in listed["items"]] == ["S1"]
    status, body = await admin.call("GET", "/v1/stores/S2", officer)
    assert (status, body["error"]["code"]) == (403, "scope_forbidden")
    status, body = await admin.call("PATCH", "/v1/stores/S1", officer, {"name": "Mine"})
    assert (status, body["error"]["code"]) == (403, "role_forbidden")
    assert (await admin.ok("GET", "/v1/stores/S1"))["name"] == "Store S1"


async def test_revoked_and_expired_tokens_stop_at_once(admin: AdminClient) -> None:
    await admin.org()
    user = await admin.ok(
        "POST", "/v1/users", json={"name": "amy", "role": "auditor", "scope_kind": "group"}
    )
    minted = await admin.ok("POST", f"/v1/users/{user['id']}/tokens", json={"label": "x"})
    assert "token" in minted
    assert (await admin.call("GET", "/v1/stores", minted["token"]))[0] == 200
    listed = await admin.ok("GET", f"/v1/users/{user['id']}/tokens")
    assert "token" not in listed["items"][0]  # the secret is shown once, never listed
    await admin.ok("DELETE", f"/v1/tokens/{minted['id']}")
    status, _ = await admin.call("GET", "/v1/stores", minted["token"])
    assert status == 401
    # an auditor reads but never writes
    second = await admin.ok("POST", f"/v1/users/{user['id']}/tokens", json={"label": "y"})
    status, body = await admin.call(
        "POST", "/v1/legal-entities", second["token"], {"id": "LE9", "name": "x"}
    )
    assert (status, body["error"]["code"]) == (403, "role_forbidden")


async def test_a_token_is_refused_once_its_ttl_has_passed(admin: AdminClient) -> None:
    await admin.org()
    org = admin.app[ORG_KEY]
    start = org.clock_ms()
    org.clock_ms = lambda: start
    user = await admin.ok(
        "POST", "/v1/users", json={"name": "amy", "role": "auditor", "scope_kind": "group"}
    )
    minted = await admin.ok("POST", f"/v1/users/{user['id']}/tokens", json={"ttl_s": 60})
    assert minted["expires_at_ms"] == start + 60_000
    org.clock_ms = lambda: start + 59_000  # read from the database, then kept a few seconds
    assert (await admin.call("GET", "/v1/stores", minted["token"]))[0] == 200
    org.clock_ms = lambda: start + 60_000  # the kept token, at its expiry
    status, body = await admin.call("GET", "/v1/stores", minted["token"])
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    org.clock_ms = lambda: start + 60_000 + limits.TOKEN_CACHE_S * 1000  # read again
    status, body = await admin.call("GET", "/v1/stores", minted["token"])
    assert (status, body["error"]["code"]) == (401, "unauthorized")


async def test_user_scope_must_fit_role_and_never_exceed_the_creator(admin: AdminClient) -> None:
    await admin.org("LE1", "S1")
    await admin.org("LE2", "S2")
    status, body = await admin.call(
        "POST", "/v1/users", json={"name": "x", "role": "store_crm", "scope_kind": "group"}
    )
    assert (status, body["error"]["code"]) == (400, "role_scope_mismatch")
    entity_admin = await admin.token("hq_admin", "entity", "LE1")
    status, body = await admin.call(
        "POST",
        "/v1/users",
        entity_admin,
        {"name": "y", "role": "store_crm", "scope_kind": "store", "scope_id": "S2"},
    )
    assert (status, body["error"]["code"]) == (403, "scope_forbidden")
    status, _ = await admin.call(
        "POST",
        "/v1/users",
        entity_admin,
        {"name": "z", "role": "store_crm", "scope_kind": "store", "scope_id": "S1"},
    )
    assert status == 201


async def test_grants_are_scoped_and_revocable(admin: AdminClient) -> None:
    await admin.org("LE1", "S1", "S2")
    grant = await admin.ok(
        "POST",
        "/v1/grants",
        json={"store": "S1", "function": "gift", "budget_count": 10, "valid_to": "2099-12-31"},
    )
    assert grant["budget_count"] == 10
    status, body = await admin.call(
        "POST", "/v1/grants", json={"store": "S1", "function": "gift",
                                    "valid_from": "2027-01-02", "valid_to": "2027-01-01"}
    )  # fmt: skip
    assert (status, body["error"]["code"]) == (400, "invalid_value")
    for name, day in (("valid_from", "2025-02-30"), ("valid_to", "2025-04-31")):
        status, body = await admin.call("POST", "/v1/grants", json={
            "store": "S1", "function": "gift", name: day})  # fmt: skip
        assert (status, body["error"]["code"], body["error"]["field"]) == (
            400, "invalid_value", name)  # fmt: skip
    assert len((await admin.ok("GET", "/v1/grants"))["items"]) == 1
    officer = await admin.token("store_crm", "store", "S2")
    assert (await admin.ok("GET", "/v1/grants", officer))["items"] == []
    status, _ = await admin.call("DELETE", f"/v1/grants/{grant['id']}", officer)
    assert status == 403
    revoked = await admin.ok("DELETE", f"/v1/grants/{grant['id']}")
    assert revoked["state"] == "revoked"


async def test_a_users_tokens_are_listed_by_pages(admin: AdminClient, db_url: str) -> None:
    """Revoked and expired tokens pile up; the live one past the first page is reached by the
    cursor, never dropped; bad paging is a stable 400."""
    await admin.org("LE1", "S1")
    user = await admin.ok("POST", "/v1/users", json={"name": "bot", "role": "auditor",
                                                   "scope_kind": "group"})  # fmt: skip
    old = ",".join(f"({user['id']}, 'h{i:063d}', 'old', 0, 1, 1)" for i in range(5))
    await sql_execute(
        db_url,
        "INSERT INTO org_api_tokens (user_id, secret_hash, label, "  # noqa: S608 - the test's rows
        f"created_at_ms, expires_at_ms, revoked_at_ms) VALUES {old}",
    )
    live = await admin.ok("POST", f"/v1/users/{user['id']}/tokens", json={"label": "live"})
    path, seen, after = f"/v1/users/{user['id']}/tokens", [], None
    while True:
        page = await admin.ok("GET", path, limit=2, **({"after": after} if after else {}))
        seen += [t["id"] for t in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    assert len(seen) == 6 and seen[-1] == live["id"] and seen == sorted(seen)
    for bad in ({"limit": "abc"}, {"bogus": "1"}):
        status, answer = await admin.call("GET", path, **bad)
        assert status == 400, (bad, answer)


async def test_bad_bodies_get_stable_codes_and_change_nothing(admin: AdminClient) -> None:
    cases = [
        ({"id": "LE1"}, "missing_field", "name"),
        ({"id": "LE1", "name": "x", "extra": 1}, "unknown_field", "extra"),
        ({"id": "L E", "name": "x"}, "invalid_value", "id"),
        ({"id": 5, "name": "x"}, "wrong_type", "id"),
    ]
    for body, code, field in cases:
        status, answer = await admin.call("POST", "/v1/legal-entities", json=body)
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (400, code, field)
    assert (await admin.ok("GET", "/v1/legal-entities"))["items"] == []
    status, answer = await admin.call("GET", "/v1/stores", limit=0)
    assert (status, answer["error"]["field"]) == (400, "limit")
    status, answer = await admin.call("GET", "/v1/stores", bogus=1)
    assert (status, answer["error"]["code"]) == (400, "unknown_parameter")


async def test_terminals_belong_to_a_store_and_a_disabled_one_is_refused_at_the_pos(
    admin: AdminClient,
) -> None:
    from cardcore.cards.http import POS_KEY  # noqa: PLC0415
    from cardcore.cards.model import Kind, Outcome, PosRequest  # noqa: PLC0415

    await admin.org("LE1", "S1", "S2")
    made = await admin.ok(
        "POST", "/v1/terminals", json={"tid": "T0000001", "mid": "M00000000000001", "store": "S1"}
    )
    assert (made["legal_entity"], len(made["tmk"]), made["state"]) == ("LE1", 32, "active")
    shown = await admin.ok("GET", "/v1/terminals/T0000001")
    assert "tmk" not in shown and "tmk_sealed" not in shown
    status, body = await admin.call(
        "POST", "/v1/terminals", json={"tid": "T0000002", "mid": "M00000000000001",
                                       "store": "NOPE"}
    )  # fmt: skip
    assert (status, body["error"]["code"]) == (404, "store_not_found")
    other = await admin.token("store_supervisor", "store", "S2")
    status, body = await admin.call("GET", "/v1/terminals/T0000001", other)
    assert (status, body["error"]["code"]) == (403, "scope_forbidden")
    assert (await admin.ok("GET", "/v1/terminals", other))["items"] == []
    pos = admin.app[POS_KEY]
    sign_on = PosRequest(kind=Kind.SIGN_ON, terminal="T0000001")
    assert (await pos.handle([sign_on]))[0].outcome is Outcome.APPROVED
    await admin.ok("PATCH", "/v1/terminals/T0000001", json={"state": "disabled"})
    assert (await pos.handle([sign_on]))[0].outcome is Outcome.TERMINAL_DISABLED
    audit = await admin.ok("GET", "/v1/audit", object_kind="terminal")
    assert [a["action"] for a in audit["items"]] == ["terminal.create", "terminal.disabled"]


async def test_audit_filters_by_time_and_an_empty_change_is_refused(admin: AdminClient) -> None:
    await admin.org("LE1", "S1")
    everything = await admin.ok("GET", "/v1/audit")
    last = everything["items"][-1]["at_ms"]
    later = await admin.ok("GET", "/v1/audit", since_ms=last + 1)
    assert later["items"] == []
    status, body = await admin.call("PATCH", "/v1/stores/S1", json={})
    assert (status, body["error"]["code"]) == (400, "invalid_value")


async def test_control_characters_and_lone_surrogates_are_refused_everywhere(
    admin: AdminClient,
) -> None:
    await admin.org("LE1", "S0")
    for body, field in (
        ({"id": "S1\n", "legal_entity": "LE1", "name": "x", "region": "r", "city": "c"}, "id"),
        ({"id": "S1", "legal_entity": "LE1", "name": "a\ud800", "region": "r", "city": "c"},
         "name"),
        ({"id": "S1", "legal_entity": "LE1", "name": "a\tb", "region": "r", "city": "c"}, "name"),
    ):  # fmt: skip
        status, answer = await admin.call("POST", "/v1/stores", json=body)
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (
            400,
            "invalid_value",
            field,
        )
    status, answer = await admin.call("GET", "/v1/stores", city="x\ny")
    assert (status, answer["error"]["field"]) == (400, "city")
    assert [s["id"] for s in (await admin.ok("GET", "/v1/stores"))["items"]] == ["S0"]


async def test_an_hq_admin_cannot_act_as_or_disable_a_peer_admin(admin: AdminClient) -> None:
    await admin.org("LE1", "S1")
    peer = await admin.ok(
        "POST", "/v1/users", json={"name": "peer", "role": "hq_admin", "scope_kind": "group"}
    )
    for method, path, body in (
        ("POST", f"/v1/users/{peer['id']}/tokens", {"label": "mine now"}),
        ("PATCH", f"/v1/users/{peer['id']}", {"state": "disabled"}),
    ):
        status, answer = await admin.call(method, path, json=body)
        assert (status, answer["error"]["code"]) == (403, "peer_forbidden")
    entity_admin = await admin.ok(
        "POST",
        "/v1/users",
        json={"name": "le1", "role": "hq_admin", "scope_kind": "entity", "scope_id": "LE1"},
    )
    assert "token" in await admin.ok("POST", f"/v1/users/{entity_admin['id']}/tokens", json={})
    assert (await admin.ok("GET", f"/v1/users/{peer['id']}"))["state"] == "active"


async def test_ids_past_the_column_range_and_odd_numbers_are_refused_cleanly(
    admin: AdminClient,
) -> None:
    for path in ("/v1/users/3000000000", "/v1/users/3000000000/tokens", "/v1/grants/99999999999"):
        status, _ = await admin.call("DELETE" if "grants" in path else "GET", path)
        assert status == 404, path
    for params in ({"after": "\u00b2"}, {"after": "99999999999999999999"}):
        status, answer = await admin.call("GET", "/v1/users", **params)
        assert (status, answer["error"]["field"]) == (400, "after"), params
    await admin.org("LE1", "S1")
    status, answer = await admin.call(
        "POST", "/v1/grants", json={"store": "S1", "function": "gift", "budget_count": 5.0}
    )
    assert (status, answer["error"]["code"]) == (400, "wrong_type")
    status, answer = await admin.call("PATCH", "/v1/stores/S1", json={"name": "evil\u202egpj"})
    assert (status, answer["error"]["code"]) == (400, "invalid_value")


async def test_a_token_revoked_while_it_is_being_read_is_not_cached(db_url: str) -> None:
    from contextlib import asynccontextmanager  # noqa: PLC0415

    from cardcore.db import make_engine  # noqa: PLC0415
    from cardcore.org.model import Role, Scope, ScopeKind  # noqa: PLC0415
    from cardcore.org.service import CONSOLE, OrgService  # noqa: PLC0415
    from cardcore.records import Records  # noqa: PLC0415

    engine = make_engine(db_url)
    records = Records(engine)
    org = OrgService(records)
    user = await org.create_user(CONSOLE, "amy", Role.AUDITOR, Scope(ScopeKind.GROUP))
    minted = await org.create_token(CONSOLE, int(user["id"]), "x", 3600)
    read, go_on = asyncio.Event(), asyncio.Event()

    class SlowReads(Records):
        @asynccontextmanager
        async def read(self) -> Any:
            async with records.read() as uow:
                yield uow
            read.set()  # the token's rows are read; the revoke lands now
            await go_on.wait()

    org.records = SlowReads(engine)
    in_flight = asyncio.create_task(org.authenticate(minted["token"]))
    await read.wait()
    org.records = records
    await org.revoke_token(CONSOLE, minted["id"])
    go_on.set()
    assert await in_flight is not None  # that request began before the revoke
    assert await org.authenticate(minted["token"]) is None
    await engine.dispose()


async def test_a_route_without_query_parameters_refuses_any(admin: AdminClient) -> None:
    await admin.org("LE1", "S1")
    for method, path in (("GET", "/v1/stores/S1"), ("PATCH", "/v1/stores/S1")):
        status, answer = await admin.call(method, path, json={} if method != "GET" else None,
                                          foo="1")  # fmt: skip
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (
            400, "unknown_parameter", "foo")  # fmt: skip


async def test_revoking_a_revoked_grant_changes_and_audits_nothing(admin: AdminClient) -> None:
    await admin.org("LE1", "S1")
    grant = await admin.ok("POST", "/v1/grants", json={"store": "S1", "function": "gift"})
    for _ in range(2):
        assert (await admin.ok("DELETE", f"/v1/grants/{grant['id']}"))["state"] == "revoked"
    audit = await admin.ok("GET", "/v1/audit", object_kind="grant")
    assert [a["action"] for a in audit["items"]].count("grant.revoke") == 1
