"""The organization's use cases: legal entities, stores, staff users, API tokens, grants, the
audit log, and turning a bearer token into a principal.

Every change checks the principal's permission and scope first, then writes the change and
its audit row in one transaction: a refused request changes nothing, an accepted one is always
audited. Tokens are random, shown once, stored as SHA-256 hashes, expiring and revocable.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from cardcore import limits
from cardcore.org.model import (
    CODE,
    GROUP,
    Function,
    Grant,
    Perm,
    Place,
    Principal,
    Refused,
    Role,
    Scope,
    ScopeKind,
    require,
    role_fits_scope,
    scoped_filter,
)
from cardcore.records import Conflict, Records, Unit

TOKEN_PREFIX = "cc_"  # noqa: S105 - the public prefix of every token, not a secret
# The principal of changes made from the command line on the server itself (bootstrap).
CONSOLE = Principal(0, "console", 0, Role.HQ_ADMIN, Scope(ScopeKind.GROUP), "")


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def day_of(now_ms: int) -> str:
    """The business day (Asia/Shanghai) of an instant, YYYY-MM-DD."""
    return time.strftime("%Y-%m-%d", time.gmtime(now_ms / 1000 + 8 * 3600))


ENTITIES, STORES, USERS, TOKENS, GRANTS, AUDIT = (
    "org_legal_entities",
    "org_stores",
    "org_staff_users",
    "org_api_tokens",
    "org_grants",
    "org_audit_log",
)


def outside(p: Principal) -> Refused:
    return Refused("forbidden", "scope_forbidden", f"outside the token's scope ({p.scope})")


class OrgService:
    def __init__(self, records: Records, clock_ms: Callable[[], int] | None = None) -> None:
        self.records = records
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._cache: dict[str, tuple[Principal, int, int]] = {}  # hash -> (p, expires, read at)
        self._generation = 0  # moves on every revoke and disable: a read before it is stale

    # --- authentication ----------------------------------------------------------------------

    async def authenticate(self, secret: str) -> Principal | None:
        """The principal of a live token; None for anything else (unknown, expired, revoked,
        disabled user). Records are re-read at least every TOKEN_CACHE_S; revoking or
        disabling through this service takes effect at once."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
            return None
        digest = token_hash(secret)
        now = self.clock_ms()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[2] < limits.TOKEN_CACHE_S * 1000:
            return cached[0] if cached[1] > now else None
        generation = self._generation
        async with self.records.read() as uow:
            token = await uow.get(TOKENS, secret_hash=digest)
            user = None if token is None else await uow.get(USERS, id=token["user_id"])
        if (
            token is None
            or user is None
            or token["revoked_at_ms"] is not None
            or token["expires_at_ms"] <= now
            or user["state"] != "active"
        ):
            self._cache.pop(digest, None)
            return None
        principal = Principal(
            user_id=int(user["id"]),
            user=user["name"],
            token_id=int(token["id"]),
            role=Role(user["role"]),
            scope=Scope(ScopeKind(user["scope_kind"]), user["scope_id"]),
            scope_entity=user["scope_entity"],
        )
        if generation != self._generation:
            return principal  # a revoke or disable ran meanwhile: answer, never cache
        if len(self._cache) >= limits.TOKEN_CACHE_ENTRIES_MAX:
            self._cache.clear()
        self._cache[digest] = (principal, int(token["expires_at_ms"]), now)
        return principal

    def _forget_principals(self) -> None:
        self._generation += 1
        self._cache.clear()

    # --- places ------------------------------------------------------------------------------

    async def store_place(
        self, store_id: str, field: str = "store", *, open_: bool = False
    ) -> Place:
        """The place of an existing store (404 when there is none; 409 when `open_` and it is
        closed)."""
        async with self.records.read() as uow:
            store = await uow.get(STORES, id=store_id)
        if store is None:
            raise Refused("not_found", "store_not_found", "no such store", field)
        if open_ and store["state"] != "open":
            raise Refused("conflict", "store_closed", "the store is closed", field)
        return Place(store["legal_entity"], store_id)

    async def check_bootstrap_place(self, entity: str, store: str | None) -> None:
        """The internal bootstrap (`/internal/v1/terminals`, `/internal/v1/cards`: trusted,
        no principal) names a legal entity and maybe a store of the organization: once the
        organization has a legal entity, an unknown one, an unknown store, or a store of
        another entity is refused (404 `entity_not_found`, `store_not_found`; 400
        `store_other_entity`). A host without an organization (a ledger alone) takes any."""
        async with self.records.read() as uow:
            if not await uow.find(ENTITIES, limit=1):
                return
            if await uow.get(ENTITIES, id=entity) is None:
                raise Refused("not_found", "entity_not_found", "no such legal entity",
                              "legal_entity")  # fmt: skip
            row = None if store is None else await uow.get(STORES, id=store)
        if store is None:
            return
        if row is None:
            raise Refused("not_found", "store_not_found", "no such store", "store")
        if row["legal_entity"] != entity:
            raise Refused("invalid", "store_other_entity",
                          f"store {store} belongs to another legal entity", "store")  # fmt: skip

    # --- legal entities ----------------------------------------------------------------------

    async def create_entity(self, p: Principal, entity_id: str, name: str) -> dict[str, Any]:
        require(p, Perm.ORG_WRITE)
        if p.scope.kind is not ScopeKind.GROUP:
            raise Refused("forbidden", "scope_forbidden", "only the group scope adds entities")
        now = self.clock_ms()
        view = {"id": entity_id, "name": name, "created_at_ms": now}
        async with self.records.begin() as uow:
            if await uow.get(ENTITIES, id=entity_id) is not None:
                raise Refused("conflict", "entity_exists", "legal entity exists", "id")
            await _insert(uow, ENTITIES, view, "entity_exists")
            await uow.audit(
                p, action="entity.create", kind="legal_entity", object_id=entity_id,
                place=Place(entity_id), before=None, after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def list_entities(self, p: Principal, after: str | None, limit: int) -> list[Any]:
        require(p, Perm.ORG_READ)
        where = {} if p.scope.kind is ScopeKind.GROUP else {"id": p.scope_entity}
        async with self.records.read() as uow:
            return await uow.find(ENTITIES, where, after=after, limit=limit)

    async def get_entity(self, p: Principal, entity_id: str) -> dict[str, Any]:
        require(p, Perm.ORG_READ)
        async with self.records.read() as uow:
            row = await uow.get(ENTITIES, id=entity_id)
        if row is None:
            raise Refused("not_found", "entity_not_found", "no such legal entity", "entity_id")
        if p.scope.kind is not ScopeKind.GROUP and entity_id != p.scope_entity:
            raise outside(p)
        return row

    # --- stores ------------------------------------------------------------------------------

    async def create_store(self, p: Principal, values: dict[str, str]) -> dict[str, Any]:
        entity = values["legal_entity"]
        require(p, Perm.ORG_WRITE, Place(entity))
        if p.scope.kind is ScopeKind.STORE:
            raise Refused("forbidden", "scope_forbidden", "a store token cannot add stores")
        now = self.clock_ms()
        view = {**values, "state": "open", "created_at_ms": now}
        async with self.records.begin() as uow:
            if await uow.get(ENTITIES, id=entity) is None:
                raise Refused(
                    "not_found", "entity_not_found", "no such legal entity", "legal_entity"
                )
            if await uow.get(STORES, id=values["id"]) is not None:
                raise Refused("conflict", "store_exists", "store exists", "id")
            await _insert(uow, STORES, view, "store_exists")
            await uow.audit(
                p, action="store.create", kind="store", object_id=values["id"],
                place=Place(entity, values["id"]), before=None, after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def list_stores(
        self, p: Principal, filters: dict[str, str], after: str | None, limit: int
    ) -> list[Any]:
        require(p, Perm.ORG_READ)
        where: dict[str, Any] = dict(filters)
        if p.scope.kind is ScopeKind.ENTITY:
            if where.get("legal_entity", p.scope.id) != p.scope.id:
                return []
            where["legal_entity"] = p.scope.id
        elif p.scope.kind is ScopeKind.STORE:
            where["id"] = p.scope.id
        async with self.records.read() as uow:
            return await uow.find(STORES, where, after=after, limit=limit)

    async def get_store(self, p: Principal, store_id: str) -> dict[str, Any]:
        place = await self.store_place(store_id, "store_id")
        require(p, Perm.ORG_READ, place)
        async with self.records.read() as uow:
            row = await uow.get(STORES, id=store_id)
        assert row is not None
        return row

    async def update_store(
        self, p: Principal, store_id: str, changes: dict[str, str]
    ) -> dict[str, Any]:
        place = await self.store_place(store_id, "store_id")
        require(p, Perm.ORG_WRITE, place)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            before = await uow.get(STORES, id=store_id)
            assert before is not None
            await uow.update(STORES, {"id": store_id}, changes)
            after = {**before, **changes}
            await uow.audit(
                p, action="store.update", kind="store", object_id=store_id,
                place=place, before=before, after=after, now_ms=now,
            )  # fmt: skip
        return after

    # --- staff users and tokens --------------------------------------------------------------

    async def _scope_entity(self, scope: Scope) -> str:
        if scope.kind is ScopeKind.GROUP:
            if scope.id:
                raise Refused("invalid", "invalid_value", "a group scope has no id", "scope_id")
            return ""
        if scope.kind is ScopeKind.ENTITY:
            async with self.records.read() as uow:
                if await uow.get(ENTITIES, id=scope.id) is None:
                    raise Refused(
                        "not_found", "entity_not_found", "no such legal entity", "scope_id"
                    )
            return scope.id
        return (await self.store_place(scope.id, "scope_id")).entity

    async def create_user(
        self, p: Principal, name: str, role: Role, scope: Scope
    ) -> dict[str, Any]:
        require(p, Perm.STAFF_WRITE)
        if not role_fits_scope(role, scope):
            raise Refused(
                "invalid",
                "role_scope_mismatch",
                "store roles need a store scope; HQ roles and auditors a group or entity scope",
                "scope_kind",
            )
        entity = await self._scope_entity(scope)
        if not p.covers_scope(scope, entity):
            raise Refused(
                "forbidden", "scope_forbidden", "the new user's scope is wider than yours"
            )
        now = self.clock_ms()
        values = {
            "name": name,
            "role": str(role),
            "scope_kind": str(scope.kind),
            "scope_id": scope.id,
            "scope_entity": entity,
            "state": "active",
            "created_at_ms": now,
        }
        async with self.records.begin() as uow:
            if await uow.get(USERS, name=name) is not None:
                raise Refused("conflict", "user_exists", "a staff user has this name", "name")
            user_id = await _insert(uow, USERS, values, "user_exists")
            view = {"id": user_id, **values}
            await uow.audit(
                p, action="user.create", kind="staff_user", object_id=user_id,
                place=_scope_place(scope, entity), before=None, after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def _user(self, p: Principal, user_id: int, perm: Perm) -> dict[str, Any]:
        require(p, perm)
        async with self.records.read() as uow:
            row = await uow.get(USERS, id=user_id)
        if row is None:
            raise Refused("not_found", "user_not_found", "no such staff user", "user_id")
        scope = Scope(ScopeKind(row["scope_kind"]), row["scope_id"])
        if not p.covers_scope(scope, row["scope_entity"]):
            raise outside(p)
        return row

    async def get_user(self, p: Principal, user_id: int) -> dict[str, Any]:
        return await self._user(p, user_id, Perm.STAFF_READ)

    async def list_users(self, p: Principal, after: int | None, limit: int) -> list[Any]:
        require(p, Perm.STAFF_READ)
        where: dict[str, Any] = {}
        if p.scope.kind is ScopeKind.ENTITY:
            where = {"scope_entity": p.scope.id, "scope_kind": ["entity", "store"]}
        elif p.scope.kind is ScopeKind.STORE:
            where = {"scope_kind": "store", "scope_id": p.scope.id}
        async with self.records.read() as uow:
            return await uow.find(USERS, where, after=after, limit=limit)

    async def set_user_state(self, p: Principal, user_id: int, state: str) -> dict[str, Any]:
        before = await self._user(p, user_id, Perm.STAFF_WRITE)
        self._may_act_for(p, before)
        if user_id == p.user_id and state != "active":
            raise Refused("conflict", "cannot_disable_self", "a user cannot disable itself")
        now = self.clock_ms()
        after = {**before, "state": state}
        async with self.records.begin() as uow:
            await uow.update(USERS, {"id": user_id}, {"state": state})
            await uow.audit(
                p, action=f"user.{state}", kind="staff_user", object_id=user_id,
                place=_user_place(before), before=before, after=after, now_ms=now,
            )  # fmt: skip
        self._forget_principals()  # a disabled user's tokens stop at once
        return after

    def _may_act_for(self, p: Principal, user: dict[str, Any]) -> None:
        """A user's tokens and state are its own business, or that of someone above it: an
        HQ admin cannot mint a token for (and so act as), disable or enable another HQ admin
        of the same scope level, only one with a strictly narrower scope."""
        if p is CONSOLE or user["id"] == p.user_id or user["role"] != Role.HQ_ADMIN:
            return
        scope = Scope(ScopeKind(user["scope_kind"]), user["scope_id"])
        narrower = p.scope.kind is ScopeKind.GROUP and scope.kind is not ScopeKind.GROUP
        if not narrower:
            raise Refused(
                "forbidden", "peer_forbidden", "another HQ admin of your level manages itself"
            )

    async def create_token(
        self, p: Principal, user_id: int, label: str, ttl_s: int
    ) -> dict[str, Any]:
        user = await self._user(p, user_id, Perm.STAFF_WRITE)
        self._may_act_for(p, user)
        if user["state"] != "active":
            raise Refused("conflict", "user_disabled", "the staff user is disabled", "user_id")
        return await self._insert_token(p, user, label, ttl_s)

    async def _insert_token(
        self, p: Principal, user: dict[str, Any], label: str, ttl_s: int
    ) -> dict[str, Any]:
        now = self.clock_ms()
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        values = {
            "user_id": user["id"],
            "secret_hash": token_hash(secret),
            "label": label,
            "created_at_ms": now,
            "expires_at_ms": now + ttl_s * 1000,
            "revoked_at_ms": None,
        }
        async with self.records.begin() as uow:
            tokens = await uow.find(TOKENS, {"user_id": user["id"], "revoked_at_ms": None})
            if sum(t["expires_at_ms"] > now for t in tokens) >= limits.TOKENS_PER_USER_MAX:
                raise Refused(
                    "conflict",
                    "too_many_tokens",
                    f"a user holds at most {limits.TOKENS_PER_USER_MAX} live tokens; revoke one",
                )
            token_id = await _insert(uow, TOKENS, values, "token_exists")
            view = token_view({"id": token_id, **values})
            await uow.audit(
                p, action="token.create", kind="api_token", object_id=token_id,
                place=_user_place(user), before=None, after=view, now_ms=now,
            )  # fmt: skip
        return {**view, "token": secret}  # the secret, shown this once

    async def list_tokens(
        self, p: Principal, user_id: int, after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """A page of the user's tokens by id (revoked and expired ones too), `limit + 1`
        rows so the page knows whether more follow."""
        await self._user(p, user_id, Perm.STAFF_READ)
        async with self.records.read() as uow:
            rows = await uow.find(TOKENS, {"user_id": user_id}, after=after, limit=limit)
        return [token_view(r) for r in rows]

    async def revoke_token(self, p: Principal, token_id: int) -> dict[str, Any]:
        async with self.records.read() as uow:
            row = await uow.get(TOKENS, id=token_id)
        if row is None:
            raise Refused("not_found", "token_not_found", "no such token", "token_id")
        user = await self._user(p, int(row["user_id"]), Perm.STAFF_WRITE)
        self._may_act_for(p, user)
        if row["revoked_at_ms"] is not None:
            return token_view(row)  # revoking twice changes nothing
        now = self.clock_ms()
        after = token_view({**row, "revoked_at_ms": now})
        async with self.records.begin() as uow:
            changed = await uow.update(
                TOKENS, {"id": token_id, "revoked_at_ms": None}, {"revoked_at_ms": now}
            )
            if not changed:  # revoked meanwhile by another request: that one audited it
                self._forget_principals()
                return token_view((await uow.get(TOKENS, id=token_id)) or row)
            await uow.audit(
                p, action="token.revoke", kind="api_token", object_id=token_id,
                place=_user_place(user), before=token_view(row), after=after, now_ms=now,
            )  # fmt: skip
        self._forget_principals()  # revoked means revoked now, not after the cache time
        return after

    async def bootstrap_admin(self, name: str, ttl_s: int) -> dict[str, Any]:
        """The first HQ admin (made if missing) and a new token for it: `cardcore admin token`."""
        if not CODE.fullmatch(name):
            raise Refused("invalid", "invalid_value", "a user name is 1-32 letters, digits . _ -")
        async with self.records.read() as uow:
            user = await uow.get(USERS, name=name)
        if user is None:
            user = await self.create_user(CONSOLE, name, Role.HQ_ADMIN, Scope(ScopeKind.GROUP))
        elif user["role"] != Role.HQ_ADMIN or user["scope_kind"] != GROUP:
            raise Refused("conflict", "user_exists", f"{name} exists and is not a group HQ admin")
        elif user["state"] != "active":
            raise Refused("conflict", "user_disabled", f"{name} is disabled")
        return await self._insert_token(CONSOLE, user, "bootstrap", ttl_s)

    # --- grants ------------------------------------------------------------------------------

    async def create_grant(self, p: Principal, values: dict[str, Any]) -> dict[str, Any]:
        place = await self.store_place(values["store"])
        require(p, Perm.GRANTS_WRITE, place)
        if p.scope.kind is ScopeKind.STORE:
            raise Refused("forbidden", "scope_forbidden", "a store cannot grant itself")
        for name in ("valid_from", "valid_to"):  # the schema checks the shape, not the day
            if values[name] and not _is_calendar_date(values[name]):
                raise Refused("invalid", "invalid_value", f"{values[name]} is no such day", name)
        if (
            values["valid_from"]
            and values["valid_to"]
            and values["valid_from"] > values["valid_to"]
        ):
            raise Refused("invalid", "invalid_value", "valid_to is before valid_from", "valid_to")
        now = self.clock_ms()
        row = {**values, "used_count": 0, "used_amount": 0, "state": "active", "created_at_ms": now}
        async with self.records.begin() as uow:
            grant_id = await _insert(uow, GRANTS, row, "grant_exists")
            view = {"id": grant_id, **row}
            await uow.audit(
                p, action="grant.create", kind="grant", object_id=grant_id,
                place=place, before=None, after=view, now_ms=now,
            )  # fmt: skip
        return view

    async def list_grants(
        self, p: Principal, store: str | None, after: int | None, limit: int
    ) -> list[Any]:
        require(p, Perm.GRANTS_READ)
        async with self.records.read() as uow:
            stores: list[str] | None = None
            if p.scope.kind is ScopeKind.ENTITY:
                rows = await uow.find(STORES, {"legal_entity": p.scope.id}, limit=100_000)
                stores = [r["id"] for r in rows]
            elif p.scope.kind is ScopeKind.STORE:
                stores = [p.scope.id]
            if store is not None:
                stores = [store] if stores is None or store in stores else []
            where = {} if stores is None else {"store": stores}
            return await uow.find(GRANTS, where, after=after, limit=limit)

    async def revoke_grant(self, p: Principal, grant_id: int) -> dict[str, Any]:
        """Revoke a grant; revoking it again answers it as it is and changes (and audits)
        nothing."""
        async with self.records.read() as uow:
            row = await uow.get(GRANTS, id=grant_id)
        if row is None:
            raise Refused("not_found", "grant_not_found", "no such grant", "grant_id")
        place = await self.store_place(row["store"])
        require(p, Perm.GRANTS_WRITE, place)
        if p.scope.kind is ScopeKind.STORE:
            raise Refused("forbidden", "scope_forbidden", "a store cannot change its grants")
        now = self.clock_ms()
        after = {**row, "state": "revoked"}
        async with self.records.begin() as uow:
            if not await uow.update(
                GRANTS, {"id": grant_id, "state": "active"}, {"state": "revoked"}
            ):
                return after  # revoked before: nothing changes
            await uow.audit(
                p, action="grant.revoke", kind="grant", object_id=grant_id,
                place=place, before=row, after=after, now_ms=now,
            )  # fmt: skip
        return after

    async def granted(self, store: str, function: Function, product: str) -> bool:
        """Whether HQ grants `store` the function (for `product`) today: a read, nothing
        spent (what a store's own rules need to keep applying)."""
        day = day_of(self.clock_ms())
        async with self.records.read() as uow:
            rows = await uow.find(GRANTS, {"store": store, "function": str(function)})
        return any(g.applies(function, product, day) for g in map(grant_of, rows))

    async def use_grant(
        self, uow: Unit, store: str, function: Function, product: str, *, count: int, amount: int
    ) -> Grant:
        """Spend `count` cards and `amount` fen of the grant that lets `store` issue or sell
        `product` today, inside the caller's transaction (so a refused change spends nothing).
        403 `not_granted` or `grant_budget_exceeded`. The guarded update cannot overspend
        under concurrent use: it matches no row when another took the room first."""
        day = day_of(self.clock_ms())
        rows = await uow.find(GRANTS, {"store": store, "function": str(function)})
        grants = [g for g in map(grant_of, rows) if g.applies(function, product, day)]
        if not grants:
            raise Refused(
                "forbidden",
                "not_granted",
                f"HQ has not granted store {store} {function} for {product or 'this product'}",
            )
        # The most specific grant first (one naming the product), then the oldest.
        for grant in sorted(grants, key=lambda g: (g.product == "", g.id)):
            if not grant.room(count, amount):
                continue
            bounds = {}
            if grant.budget_count is not None:
                bounds["used_count"] = grant.budget_count
            if grant.budget_amount is not None:
                bounds["used_amount"] = grant.budget_amount
            changed = await uow.update(
                GRANTS,
                {"id": grant.id, "state": "active"},
                {"used_count": ("+", count), "used_amount": ("+", amount)},
                at_most=bounds,
            )
            if changed:
                return grant
        raise Refused("forbidden", "grant_budget_exceeded", "the grant's budget is used up")

    async def give_back_grant(self, uow: Unit, grant_id: int, amount: int) -> None:
        """Give `amount` fen back to the grant's used amount, inside the caller's
        transaction (a POS top-up whose hold ended without its value staying). Whatever the
        grant's state now: what was spent from it is returned to it. Never below zero."""
        await uow.update(
            GRANTS, {"id": grant_id}, {"used_amount": ("+", -amount)},
            at_least={"used_amount": 0},
        )  # fmt: skip

    # --- audit -------------------------------------------------------------------------------

    async def audit_page(
        self, p: Principal, filters: dict[str, Any], after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        require(p, Perm.AUDIT_READ)
        scoped = scoped_filter(p, filters, entity_column="entity")
        if scoped is None:
            return []
        where: dict[str, Any] = scoped
        since = where.pop("since_ms", None)
        async with self.records.read() as uow:
            rows = await uow.find(
                AUDIT,
                where,
                after=after,
                limit=limit,
                at_least=None if since is None else {"at_ms": since},
            )
        for row in rows:
            for name in ("before", "after"):
                row[name] = None if row[name] is None else json.loads(row[name])
        return rows


async def _insert(uow: Unit, table: str, values: dict[str, Any], code: str) -> int | None:
    try:
        return await uow.insert(table, values)
    except Conflict:
        raise Refused("conflict", code, "made at the same moment by another request") from None


def grant_of(row: dict[str, Any]) -> Grant:
    return Grant(
        id=int(row["id"]),
        store=row["store"],
        function=Function(row["function"]),
        product=row["product"],
        budget_count=None if row["budget_count"] is None else int(row["budget_count"]),
        budget_amount=None if row["budget_amount"] is None else int(row["budget_amount"]),
        used_count=int(row["used_count"]),
        used_amount=int(row["used_amount"]),
        valid_from=row["valid_from"],
        valid_to=row["valid_to"],
        state=row["state"],
    )


def _scope_place(scope: Scope, entity: str) -> Place:
    if scope.kind is ScopeKind.STORE:
        return Place(entity, scope.id)
    return Place(entity)


def _user_place(user: dict[str, Any]) -> Place:
    return _scope_place(
        Scope(ScopeKind(user["scope_kind"]), user["scope_id"]), user["scope_entity"]
    )


def token_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "user_id": int(row["user_id"]),
        "label": row["label"],
        "created_at_ms": int(row["created_at_ms"]),
        "expires_at_ms": int(row["expires_at_ms"]),
        "revoked_at_ms": None if row["revoked_at_ms"] is None else int(row["revoked_at_ms"]),
    }


def _is_calendar_date(text: str) -> bool:
    """Whether YYYY-MM-DD names a day of the calendar (2025-02-30 does not)."""
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True
