"""The ledger over HTTP, on SQLite and PostgreSQL: behaviour and every kind of bad input."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from cardcore import limits
from cardcore.ledger.http import LEDGER_KEY
from tests.helpers import ApiClient, post_ops, transfer_json

WALLET = {"no_overdraft": True}


async def setup(api: ApiClient) -> dict[str, int]:
    results = await post_ops(
        api,
        [
            {"op": "create_asset", "code": "CNY", "kind": "currency", "scale": 2, "name": "RMB"},
            {"op": "create_asset", "code": "PTS", "kind": "points", "scale": 0, "name": "Points"},
        ],
    )
    assert [r["status"] for r in results] == ["ok", "ok"]
    names = {
        "float": ("CNY", "entity", "LE1", "float", {}),
        "card": ("CNY", "card", "C1", "stored_value", WALLET),
        "shop": ("CNY", "store", "S1", "sales", {}),
        "points": ("PTS", "card", "C1", "points", WALLET),
    }
    created = await post_ops(
        api,
        [
            {
                "op": "create_account",
                "asset": asset,
                "legal_entity": "LE1",
                "owner_kind": kind,
                "owner_id": owner,
                "purpose": purpose,
                "flags": flags,
            }
            for asset, kind, owner, purpose, flags in names.values()
        ],
    )
    ids = {name: r["account_id"] for name, r in zip(names, created, strict=True)}
    funded = await post_ops(
        api, [transfer_json("fund", ids["float"], ids["card"], 10_000)], "setup"
    )
    assert funded[0]["status"] == "ok"
    return ids


async def balance(api: ApiClient, account_id: int) -> dict[str, Any]:
    response = await api.get(f"/internal/v1/accounts/{account_id}")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_purchase_moves_money_and_replay_has_no_second_effect(api: ApiClient) -> None:
    ids = await setup(api)
    op = transfer_json(
        "sale-1",
        ids["card"],
        ids["shop"],
        2_500,
        reason="purchase",
        metadata={"store": "S1", "terminal": "T1", "stan": "000001"},
    )
    first = await post_ops(api, [op])
    again = await post_ops(api, [op])
    assert first[0]["status"] == "ok" and "replayed" not in first[0]
    assert again[0] == {**first[0], "replayed": True}
    card = await balance(api, ids["card"])
    assert card["credits_posted"] - card["debits_posted"] == 7_500
    assert card["version"] == 2


async def test_insufficient_funds_keeps_failing_under_its_key(api: ApiClient) -> None:
    ids = await setup(api)
    op = transfer_json("big", ids["card"], ids["shop"], 10_001)
    first = await post_ops(api, [op])
    assert first[0]["code"] == "exceeds_credits"
    assert first[0]["field"] == "postings[0].account_id"
    await post_ops(api, [transfer_json("more", ids["float"], ids["card"], 5_000)], "setup")
    again = await post_ops(api, [op])
    assert again[0]["code"] == "id_already_failed"
    assert again[0]["original_code"] == "exceeds_credits"
    changed = await post_ops(api, [transfer_json("big", ids["card"], ids["shop"], 10)])
    assert changed[0]["code"] == "exists_with_different_postings"


async def test_hold_then_partial_post_then_void_is_refused(api: ApiClient) -> None:
    ids = await setup(api)
    hold = await post_ops(
        api, [transfer_json("h", ids["card"], ids["shop"], 4_000, pending=True, timeout_s=300)]
    )
    pid = hold[0]["transfer_id"]
    card = await balance(api, ids["card"])
    assert card["debits_pending"] == 4_000
    posted = await post_ops(
        api, [{"op": "post_pending", "key": "p", "pending_id": pid, "amount": 3_000}]
    )
    assert posted[0]["status"] == "ok"
    voided = await post_ops(api, [{"op": "void_pending", "key": "v", "pending_id": pid}])
    assert voided[0]["code"] == "pending_transfer_already_posted"
    card = await balance(api, ids["card"])
    assert (card["debits_posted"], card["debits_pending"]) == (3_000, 0)


async def test_linked_group_is_all_or_nothing_over_http(api: ApiClient) -> None:
    ids = await setup(api)
    results = await post_ops(
        api,
        [
            transfer_json("g1", ids["card"], ids["shop"], 5_000, linked=True),
            transfer_json("g2", ids["card"], ids["shop"], 6_000),
        ],
    )
    assert [r["code"] for r in results] == ["linked_event_failed", "exceeds_credits"]
    card = await balance(api, ids["card"])
    assert card["debits_posted"] == 0


async def test_frozen_card_is_declined_and_unfrozen_card_works(api: ApiClient) -> None:
    ids = await setup(api)
    await post_ops(
        api, [{"op": "set_account_frozen", "account_id": ids["card"], "debit_frozen": True}]
    )
    declined = await post_ops(api, [transfer_json("s1", ids["card"], ids["shop"], 1)])
    assert declined[0]["code"] == "debit_account_frozen"
    await post_ops(
        api, [{"op": "set_account_frozen", "account_id": ids["card"], "debit_frozen": False}]
    )
    accepted = await post_ops(api, [transfer_json("s2", ids["card"], ids["shop"], 1)])
    assert accepted[0]["status"] == "ok"


async def test_unknown_account_and_mixed_assets_are_per_operation_errors(api: ApiClient) -> None:
    ids = await setup(api)
    results = await post_ops(
        api,
        [
            transfer_json("u1", ids["card"], 999_999, 1),
            transfer_json("u2", ids["card"], ids["points"], 1),
        ],
    )
    assert [(r["code"], r["field"]) for r in results] == [
        ("account_not_found", "postings[1].account_id"),
        ("account_asset_mismatch", "postings[1].account_id"),
    ]
    assert all(r["message"] for r in results)


async def test_entries_are_paged_with_balance_after(api: ApiClient) -> None:
    ids = await setup(api)
    await post_ops(api, [transfer_json(f"s{i}", ids["card"], ids["shop"], 100) for i in range(5)])
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
        page = await (await api.get(f"/internal/v1/accounts/{ids['card']}/entries{query}")).json()
        seen.extend(page["entries"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [e["version"] for e in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1]["debits_posted"] == 500 and seen[-1]["credits_posted"] == 10_000
    newest = await (
        await api.get(f"/internal/v1/accounts/{ids['card']}/entries?order=desc&limit=1")
    ).json()
    assert newest["entries"][0]["version"] == 6


async def test_journal_serves_committed_batches_in_order_with_chained_hashes(
    api: ApiClient,
) -> None:
    await setup(api)
    page = await (await api.get("/internal/v1/journal?after=0&limit=2")).json()
    assert [b["seq"] for b in page["batches"]] == [1, 2]
    assert page["batches"][1]["prev_hash"] == page["batches"][0]["hash"]
    rest = await (await api.get(f"/internal/v1/journal?after={page['next_after']}")).json()
    assert [b["seq"] for b in rest["batches"]] == [3]
    assert rest["batches"][0]["transfers"][0]["key"] == "fund"


async def test_health_ready_and_metrics(api: ApiClient) -> None:
    assert (await api.get("/healthz")).status == 200
    ready = await api.get("/readyz")
    assert ready.status == 200
    await setup(api)
    text = await (await api.get("/metrics")).text()
    assert 'cardcore_ledger_ops_total{result="ok"}' in text
    assert "cardcore_ledger_commit_seconds_bucket" in text
    assert "cardcore_ledger_queue_depth" in text
    assert "cardcore_ledger_batch_ops_bucket" in text


def _ops(*ops: dict[str, Any]) -> dict[str, Any]:
    return {"client": "t", "ops": list(ops)}


GOOD = transfer_json("k", 2, 3, 10)

BAD_BODIES = [
    pytest.param(b"{not json", "invalid_json", None, id="malformed"),
    pytest.param(b'{"ops": [], "ops": []}', "duplicate_field", "ops", id="duplicate-name"),
    pytest.param(b"\xff\xfe", "invalid_json", None, id="not-utf8"),
    pytest.param(json.dumps([GOOD]).encode(), "wrong_type", None, id="not-an-object"),
    pytest.param(
        json.dumps({"ops": [GOOD], "extra": 1}).encode(), "unknown_field", "extra", id="unknown-top"
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "colour": "red"})).encode(),
        "unknown_field",
        "ops[0].colour",
        id="unknown-op-field",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "op": "mint"})).encode(),
        "invalid_value",
        "ops[0].op",
        id="unknown-op",
    ),
    pytest.param(json.dumps({"ops": []}).encode(), "too_few_ops", "ops", id="no-ops"),
    pytest.param(
        json.dumps(_ops(*[GOOD] * (limits.REQUEST_OPS_MAX + 1))).encode(),
        "too_many_ops",
        "ops",
        id="too-many-ops",
    ),
    pytest.param(
        json.dumps(_ops(transfer_json("k", 2, 3, 0))).encode(),
        "amount_must_be_positive",
        "ops[0].postings[0].amount",
        id="zero",
    ),
    pytest.param(
        json.dumps(_ops(transfer_json("k", 2, 3, -5))).encode(),
        "amount_must_be_positive",
        "ops[0].postings[0].amount",
        id="negative",
    ),
    pytest.param(
        json.dumps(_ops(transfer_json("k", 2, 3, 2**63))).encode(),
        "amount_too_large",
        "ops[0].postings[0].amount",
        id="huge",
    ),
    pytest.param(
        json.dumps(_ops(transfer_json("k", 2, 3, 10)))
        .replace('"amount": 10', '"amount": 1.5')
        .encode(),
        "wrong_type",
        "ops[0].postings[0].amount",
        id="float-amount",
    ),
    pytest.param(
        json.dumps(_ops(transfer_json("k", 2, 3, True))).encode(),
        "wrong_type",
        "ops[0].postings[0].amount",
        id="bool-amount",
    ),
    pytest.param(
        json.dumps(_ops(transfer_json("k", 2, 3, 10)))
        .replace('"amount": 10', '"amount": "10"')
        .encode(),
        "wrong_type",
        "ops[0].postings[0].amount",
        id="string-amount",
    ),
    pytest.param(
        json.dumps(_ops(transfer_json("k", 2, 3, 10)))
        .replace('"amount": 10', '"amount": NaN')
        .encode(),
        "invalid_json",
        None,
        id="nan",
    ),
    pytest.param(
        json.dumps(
            _ops({**GOOD, "postings": [GOOD["postings"][0], {**GOOD["postings"][1], "amount": 9}]})
        ).encode(),
        "postings_unbalanced",
        "ops[0].postings",
        id="unbalanced",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "postings": GOOD["postings"][:1]})).encode(),
        "too_few_postings",
        "ops[0].postings",
        id="one-posting",
    ),
    pytest.param(
        json.dumps(
            _ops(
                {
                    **GOOD,
                    "postings": [GOOD["postings"][0], {**GOOD["postings"][1], "account_id": 2}],
                }
            )
        ).encode(),
        "accounts_must_be_different",
        "ops[0].postings[1].account_id",
        id="same-account",
    ),
    pytest.param(
        json.dumps(
            _ops(
                {**GOOD, "postings": [{**GOOD["postings"][0], "side": "left"}, GOOD["postings"][1]]}
            )
        ).encode(),
        "invalid_value",
        "ops[0].postings[0].side",
        id="bad-side",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "key": "k" * (limits.KEY_CHARS_MAX + 1)})).encode(),
        "string_too_long",
        "ops[0].key",
        id="long-key",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "key": "a b"})).encode(),
        "invalid_characters",
        "ops[0].key",
        id="key-space",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "metadata": {"store": "S\x00"}})).encode(),
        "invalid_characters",
        "ops[0].metadata.store",
        id="control-char",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "metadata": {"pan": "6200"}})).encode(),
        "unknown_field",
        "ops[0].metadata.pan",
        id="unknown-metadata",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "metadata": {"rrn": "x" * 65}})).encode(),
        "string_too_long",
        "ops[0].metadata.rrn",
        id="long-metadata",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "timeout_s": 5})).encode(),
        "invalid_value",
        "ops[0].timeout_s",
        id="timeout-on-posted",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "linked": True})).encode(),
        "linked_chain_open",
        "ops[0].linked",
        id="open-chain",
    ),
    pytest.param(
        json.dumps(_ops({**GOOD, "asset": "cny"})).encode(),
        "invalid_characters",
        "ops[0].asset",
        id="asset-lowercase",
    ),
    pytest.param(
        json.dumps(_ops({"op": "post_pending", "key": "p"})).encode(),
        "missing_field",
        "ops[0].pending_id",
        id="missing-pending-id",
    ),
]


@pytest.mark.parametrize(("body", "code", "field"), BAD_BODIES)
async def test_bad_input_gets_stable_error_and_changes_nothing(
    api: ApiClient, body: bytes, code: str, field: str | None
) -> None:
    ids = await setup(api)
    before = await (await api.get("/internal/v1/journal")).json()
    response = await api.post(
        "/internal/v1/ops", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    after = await (await api.get("/internal/v1/journal")).json()
    assert after == before
    assert (await balance(api, ids["card"]))["version"] == 1


async def test_oversize_body_is_refused_with_413(api: ApiClient) -> None:
    response = await api.post(
        "/internal/v1/ops",
        data=b" " * (limits.REQUEST_BODY_BYTES_MAX + 1),
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/internal/v1/accounts/0", 400, "invalid_value"),
        ("/internal/v1/accounts/abc", 400, "invalid_value"),
        ("/internal/v1/accounts/99999999999999999999", 400, "invalid_value"),
        ("/internal/v1/accounts/424242", 404, "account_not_found"),
        ("/internal/v1/accounts/1/entries?limit=0", 400, "invalid_value"),
        ("/internal/v1/accounts/1/entries?limit=x", 400, "wrong_type"),
        ("/internal/v1/accounts/1/entries?order=sideways", 400, "invalid_value"),
        ("/internal/v1/journal?after=-1", 400, "wrong_type"),
        ("/internal/v1/journal?limit=100000", 400, "invalid_value"),
        ("/nowhere", 404, "not_found"),
    ],
)
async def test_bad_reads_get_stable_errors(
    api: ApiClient, path: str, status: int, code: str
) -> None:
    await setup(api)
    response = await api.get(path)
    assert response.status == status
    assert (await response.json())["error"]["code"] == code


async def test_deeply_nested_body_gets_invalid_json_not_a_server_error(api: ApiClient) -> None:
    deep = await api.post(
        "/internal/v1/ops", data=b"[" * 100_000, headers={"Content-Type": "application/json"}
    )
    assert deep.status == 400
    assert (await deep.json())["error"]["code"] == "invalid_json"


async def test_a_body_not_sent_as_json_is_refused_415_and_changes_nothing(api: ApiClient) -> None:
    """A web page may POST `text/plain` to any address without a preflight: the internal API
    (no token on a loopback listener) took one and moved money (a security review)."""
    ids = await setup(api)
    before = await (await api.get("/internal/v1/journal")).json()
    op = transfer_json("csrf-1", ids["float"], ids["shop"], 100)
    body = json.dumps({"client": "web", "ops": [op]}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {} if kind is None else {"Content-Type": kind}
        response = await api.post("/internal/v1/ops", data=body, headers=headers)
        assert response.status == 415, kind
        assert (await response.json())["error"]["code"] == "unsupported_media_type"
    assert await (await api.get("/internal/v1/journal")).json() == before
    sent = await api.post(
        "/internal/v1/ops", data=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert sent.status == 200, await sent.text()
    assert (await sent.json())["results"][0]["status"] == "ok"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example"])
async def test_without_a_token_internal_answers_loopback_names_only(
    api: ApiClient, host: str
) -> None:
    """A page whose name was made to resolve to 127.0.0.1 (DNS rebinding) is same-origin with
    it and could read what /internal answers: without an internal token the Host must be a
    loopback name."""
    await setup(api)
    response = await api.get("/internal/v1/journal", headers={"Host": host})
    assert response.status == 421
    assert (await response.json())["error"]["code"] == "misdirected_request"
    for fine in ("127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:80"):
        assert (await api.get("/internal/v1/journal", headers={"Host": fine})).status == 200


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_readiness_says_not_ready_while_the_database_is_away(
    api: ApiClient, db_url: str
) -> None:
    """/readyz said ready while every request answered 503 (an operations review): it asks
    the database now, and is ready again once the database is back, without a restart."""
    await setup(api)
    assert (await api.get("/readyz")).status == 200
    name = make_url(db_url).database
    admin = await asyncpg.connect(
        make_url(db_url)
        .set(database="postgres", drivername="postgresql")
        .render_as_string(hide_password=False)
    )
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{name}_away"')
        try:
            away = await api.get("/readyz")
            assert away.status == 503
            assert (await away.json())["error"]["code"] == "not_ready"
        finally:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                f"{name}_away",
            )
            await admin.execute(f'ALTER DATABASE "{name}_away" RENAME TO "{name}"')
    finally:
        await admin.close()
    for _ in range(50):  # the pool reconnects on its next check-out
        if (await api.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.1)
    assert (await api.get("/readyz")).status == 200


async def test_readiness_is_not_fooled_by_a_busy_pool(api: ApiClient) -> None:
    """The readiness ping took a connection from the pool the requests use: with every one
    of them busy it said not ready after 2 s while the database was fine (a review)."""
    await setup(api)
    engine = api.app[LEDGER_KEY].store.engine
    held = []
    try:
        for _ in range(limits.DB_POOL_SIZE_MAX - 2):  # the writer holds two
            held.append(await engine.connect())
        ready = await api.get("/readyz")
        assert ready.status == 200, await ready.text()
    finally:
        for conn in held:
            await conn.close()
