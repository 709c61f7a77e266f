"""Service cards: the products HQ defines, the packages a counter sells onto a card, their
redemption at the POS, and refunds of unused entitlements.

Rules of every use case:
- Products belong to a legal entity and are defined by HQ (`programs_write`, a group or an
  entity scope); everyone with `loyalty_read` in that entity (its stores included) reads them.
- A sale is counter work (`services_sell`) in a store that HQ granted `service` (for the
  product, or every product), on a card the caller's scope covers: the member pays the price
  in cash or by bank card (the store's till to its sales account, reason `service_sale`),
  then the package is written with the grant spent and the audit row, in one transaction.
  The caller's `key` makes it idempotent; a sale whose package could not be written is
  reversed in the ledger, and its key is spent (409 `service_sale_undone`).
- A redemption at the POS (`redeem`) takes uses by a guarded UPDATE (uses left >= asked),
  with a row under the POS key in the same transaction, so a resend answers the same and a
  reversal (`reverse`) gives the uses back exactly once.
- A package keeps the terms of the day it was sold: the uses, the expiry, the price paid,
  the product's stores (where it may be redeemed) and its refund terms. A redemption and a
  refund follow those, never the product's terms today (they do not read the product). One
  exception: a package sold by code older than migration 0009 recorded no stores (NULL),
  and one sold by code older than 0007 no refund terms either; it is redeemable in its
  product's stores and refunded by its product's refund terms as they are at each use and
  refund (what that code read), so its product is read with it (`with_terms`), and only
  then.
- A refund marks the package refunded first (a guarded update on the uses left that were
  read, so no redemption slips in between), then pays the unused share from the selling
  store's sales back to its till; a retry with the same key pays the same, once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NoReturn

from cardcore import limits
from cardcore.cards import admin
from cardcore.cards.accounts import Accounts, AccountsUnavailable
from cardcore.cards.model import (
    CURRENCY,
    POS_CLIENT,
    Card,
    CardState,
    Outcome,
    PosRequest,
    PosResult,
)
from cardcore.cards.model import Terminal as PosTerminal
from cardcore.cards.service import COUNTER_CLIENT, TENDERS, expired, metadata, place_of
from cardcore.ledger.decide import TOMBSTONE_CODE
from cardcore.ledger.model import CreateTransfer, Op, Posting, Result, Reverse, Side
from cardcore.ledger.service import Ledger
from cardcore.ledger.writer import Busy, LedgerUnavailable
from cardcore.localtime import DEFAULT_TIMEZONE
from cardcore.org.model import Function, Perm, Place, Principal, Refused, ScopeKind, require
from cardcore.org.service import OrgService
from cardcore.records import Conflict, Records, Unit
from cardcore.service_cards import model
from cardcore.service_cards.model import (
    Entitlement,
    EntitlementState,
    RefundPolicy,
    RefundTerms,
)

log = logging.getLogger(__name__)

PRODUCTS, PACKAGES, REDEMPTIONS = "service_products", "service_entitlements", "service_redemptions"
CARDS, ENTITIES, STORES = "cards", "org_legal_entities", "org_stores"
SALE_REASON, REFUND_REASON = "service_sale", "service_refund"
NO_PACKAGE = "service_no_package"  # the card holds no package of the product asked
# The model's refusal codes -> the POS outcome that carries them.
_OUTCOME_OF_REFUSAL = {
    model.NO_USES_LEFT: Outcome.INSUFFICIENT_FUNDS,
    model.BAD_COUNT: Outcome.BAD_REQUEST,
}


class ServicesUnavailable(Exception):
    """The ledger could not take a step now (busy, unavailable); retry the request."""


class _DryRun(Exception):
    """Leaves a transaction that only checked something, rolling it back."""


# --- records <-> the model ------------------------------------------------------------------------


def product_of(row: dict[str, Any]) -> model.ServiceProduct:
    d = json.loads(row["definition"])
    return model.ServiceProduct(
        code=row["code"],
        name=row["name"],
        uses=int(d["uses"]),
        price_fen=int(d["price_fen"]),
        validity_months=int(d["validity_months"]),
        stores=frozenset(d["stores"]),
        refund_policy=RefundPolicy(d["refund_policy"]),
        refund_fee_fen=int(d["refund_fee_fen"]),
        single_use_price_fen=int(d["single_use_price_fen"]),
        refund_after_expiry=bool(d["refund_after_expiry"]),
    )


def definition_of(p: model.ServiceProduct) -> str:
    return json.dumps(
        {
            "uses": p.uses,
            "price_fen": p.price_fen,
            "validity_months": p.validity_months,
            "stores": sorted(p.stores),
            "refund_policy": str(p.refund_policy),
            "refund_fee_fen": p.refund_fee_fen,
            "single_use_price_fen": p.single_use_price_fen,
            "refund_after_expiry": p.refund_after_expiry,
        },
        sort_keys=True,
    )


def product_view(row: dict[str, Any]) -> dict[str, Any]:
    p = product_of(row)
    return {
        "code": p.code,
        "name": p.name,
        "legal_entity": row["legal_entity"],
        "uses": p.uses,
        "price_fen": p.price_fen,
        "validity_months": p.validity_months,
        "stores": sorted(p.stores),
        "refund_policy": str(p.refund_policy),
        "refund_fee_fen": p.refund_fee_fen,
        "single_use_price_fen": p.single_use_price_fen,
        "refund_after_expiry": p.refund_after_expiry,
        "state": row["state"],
        "created_at_ms": int(row["created_at_ms"]),
        "updated_at_ms": int(row["updated_at_ms"]),
    }


def entitlement_of(row: dict[str, Any]) -> Entitlement:
    """The model's package of a row whose terms are all known (`with_terms` fills those a
    sale by older code did not record)."""
    assert not _unrecorded(row), "a package row read without with_terms"
    return Entitlement(
        id=int(row["id"]),
        product_code=row["product"],
        uses_total=int(row["uses_total"]),
        uses_left=int(row["uses_left"]),
        sold_ms=int(row["sold_ms"]),
        expires_ms=int(row["expires_ms"]),
        price_fen=int(row["price_fen"]),
        state=EntitlementState(row["state"]),
        refund_terms=RefundTerms(
            policy=RefundPolicy(row["refund_policy"]),
            fee_fen=int(row["refund_fee_fen"]),
            single_use_price_fen=int(row["single_use_price_fen"]),
            after_expiry=bool(row["refund_after_expiry"]),
        ),
        stores=frozenset(json.loads(row["stores"])),
    )


def stores_text(stores: frozenset[str]) -> str:
    """A package's stores as its row keeps them: a JSON list, sorted ([] = every store)."""
    return json.dumps(sorted(stores))


# A package row's refund terms: a sale writes all four, or (code older than migration 0007)
# none of them (NULL); a row missing any of them takes all four from its product.
REFUND_TERMS = ("refund_policy", "refund_fee_fen", "single_use_price_fen", "refund_after_expiry")
# The terms of a package that recorded none and whose product is gone (none ever is): no
# refund, as migration 0007 filled such packages.
NO_REFUND = RefundTerms(policy=RefundPolicy.NONE, fee_fen=0, single_use_price_fen=0,
                        after_expiry=False)  # fmt: skip


def terms_columns(terms: RefundTerms) -> dict[str, Any]:
    """A package's refund terms as its row keeps them (the columns `REFUND_TERMS`)."""
    return {
        "refund_policy": str(terms.policy),
        "refund_fee_fen": terms.fee_fen,
        "single_use_price_fen": terms.single_use_price_fen,
        "refund_after_expiry": terms.after_expiry,
    }


def _terms_unrecorded(row: dict[str, Any]) -> bool:
    return any(row[name] is None for name in REFUND_TERMS)


def _unrecorded(row: dict[str, Any]) -> bool:
    """Whether a package row lacks a term of its sale (sold by code older than 0009 or 0007)."""
    return row["stores"] is None or _terms_unrecorded(row)


async def with_terms(uow: Unit, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Package rows with every term known. A row sold by code older than migration 0009
    recorded no stores (NULL), one sold by code older than 0007 no refund terms either: it
    gets its product's as they are now, read here (what that code read at each use and
    refund); its product gone (none ever is), the store that sold it and no refund (the
    rules of 0009 and 0007). One read of the products of all such rows; rows that recorded
    every term come back as they are, with no statement run. Nothing is written back."""
    codes = sorted({row["product"] for row in rows if _unrecorded(row)})
    if not codes:
        return rows
    found = await uow.find(PRODUCTS, {"code": codes}, order="code", limit=len(codes))
    products = {row["code"]: product_of(row) for row in found[: len(codes)]}
    return [_known(row, products.get(row["product"])) for row in rows]


def _known(row: dict[str, Any], product: model.ServiceProduct | None) -> dict[str, Any]:
    """`row` with the terms it did not record taken from `product` (None: gone)."""
    if not _unrecorded(row):
        return row
    known = dict(row)
    if row["stores"] is None:
        stores = frozenset({row["store"]}) if product is None else product.stores
        known["stores"] = stores_text(stores)
    if _terms_unrecorded(row):
        terms = NO_REFUND if product is None else model.refund_terms_of(product)
        known.update(terms_columns(terms))
    return known


def package_view(row: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """A sold package as answers and audit images show it; an active one past its expiry
    shows as expired."""
    e = entitlement_of(row)
    state = e.state
    if state is EntitlementState.ACTIVE and model.is_expired(e, now_ms):
        state = EntitlementState.EXPIRED
    return {
        "id": e.id,
        "product": e.product_code,
        "holder": int(row["holder"]),
        "member_id": None if row["member_id"] is None else int(row["member_id"]),
        "store": row["store"],
        "uses_total": e.uses_total,
        "uses_left": e.uses_left,
        "price_fen": e.price_fen,
        "refund_policy": str(e.refund_terms.policy),
        "refund_fee_fen": e.refund_terms.fee_fen,
        "single_use_price_fen": e.refund_terms.single_use_price_fen,
        "refund_after_expiry": e.refund_terms.after_expiry,
        "stores": sorted(e.stores),
        "sold_ms": e.sold_ms,
        "expires_ms": e.expires_ms,
        "state": str(state),
        "refunded_fen": int(row["refunded_fen"]),
        "updated_at_ms": int(row["updated_at_ms"]),
    }


def sees_entity(p: Principal, entity: str) -> bool:
    """Whether `p` may read an object of legal entity `entity` (a store sees its entity's)."""
    if p.scope.kind is ScopeKind.GROUP:
        return True
    if p.scope.kind is ScopeKind.ENTITY:
        return p.scope.id == entity
    return p.scope_entity == entity


def _sale_key(store: str, key: str) -> str:
    return f"{store}/{key}"


def _ledger_sale_key(store: str, key: str) -> str:
    return f"service-sale/{store}/{key}"


def _ledger_refund_key(package_id: int, key: str) -> str:
    """A refund's ledger key: the caller's key within its package (the package is marked
    refunded under the key before the money moves, so the key must name this package)."""
    return f"service-refund/{package_id}/{key}"


def _undo_key(key: str) -> str:
    return key[: limits.KEY_CHARS_MAX - 2] + "/R"


# --- the service ---------------------------------------------------------------------------------


class ServiceCards:
    def __init__(  # noqa: PLR0917 - the services it composes, one each, in a fixed order
        self,
        records: Records,
        org: OrgService,
        ledger: Ledger,
        accounts: Accounts,
        clock_ms: Callable[[], int] | None = None,
        tz: str = DEFAULT_TIMEZONE,
    ) -> None:
        self.records = records
        self.org = org
        self.ledger = ledger
        self.accounts = accounts
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.tz = tz
        self._currency_ready = False

    # --- products ---------------------------------------------------------------------------

    async def create_product(self, p: Principal, values: dict[str, Any]) -> dict[str, Any]:
        entity = values["legal_entity"]
        require(p, Perm.PROGRAMS_WRITE, Place(entity))
        _require_hq(p)
        price, uses = values["price_fen"], values["uses"]
        product = model.ServiceProduct(
            code=values["code"],
            name=values["name"],
            uses=uses,
            price_fen=price,
            validity_months=values["validity_months"],
            stores=frozenset(values.get("stores", ())),
            refund_policy=RefundPolicy(values.get("refund_policy", RefundPolicy.PRO_RATA)),
            refund_fee_fen=values.get("refund_fee_fen", 0),
            single_use_price_fen=values.get(
                "single_use_price_fen", -(-price // uses) if uses > 0 else price
            ),
            refund_after_expiry=values.get("refund_after_expiry", False),
        )
        model.check_product(product)
        now = self.clock_ms()
        row = {
            "code": product.code,
            "name": product.name,
            "legal_entity": entity,
            "definition": definition_of(product),
            "state": "active",
            "created_at_ms": now,
            "updated_at_ms": now,
        }
        async with self.records.begin() as uow:
            await _touch(uow, PRODUCTS, code=product.code)
            if await uow.get(ENTITIES, id=entity) is None:
                raise Refused("not_found", "entity_not_found", "no such legal entity",
                              "legal_entity")  # fmt: skip
            await _check_stores(uow, entity, product.stores)
            if await uow.get(PRODUCTS, code=product.code) is not None:
                raise Refused("conflict", "product_exists", "a service product has this code",
                              "code")  # fmt: skip
            try:
                await uow.insert(PRODUCTS, row)
            except Conflict:
                raise Refused("conflict", "product_exists", "made at the same moment") from None
            view = product_view(row)
            await uow.audit(
                p, action="service_product.create", kind="service_product",
                object_id=product.code, place=Place(entity), before=None, after=view,
                now_ms=now,
            )  # fmt: skip
        return view

    async def list_products(
        self, p: Principal, filters: dict[str, Any], after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        require(p, Perm.LOYALTY_READ)
        where = dict(filters)
        if p.scope.kind is not ScopeKind.GROUP:
            own = p.scope.id if p.scope.kind is ScopeKind.ENTITY else p.scope_entity
            if where.get("legal_entity", own) != own:
                return []
            where["legal_entity"] = own
        async with self.records.read() as uow:
            rows = await uow.find(PRODUCTS, where, order="code", after=after, limit=limit)
        return [product_view(r) for r in rows]

    async def get_product(self, p: Principal, code: str) -> dict[str, Any]:
        require(p, Perm.LOYALTY_READ)
        row = await self._product_row(code, "code")
        if not sees_entity(p, row["legal_entity"]):
            raise Refused("forbidden", "scope_forbidden", f"outside the token's scope ({p.scope})")
        return product_view(row)

    async def update_product(
        self, p: Principal, code: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change a product: later sales use its new terms; packages sold before keep the
        terms of their sale (uses, expiry, price, stores, refund terms); a retired product
        sells no more."""
        require(p, Perm.PROGRAMS_WRITE)
        _require_hq(p)
        now = self.clock_ms()
        async with self.records.begin() as uow:
            await _touch(uow, PRODUCTS, code=code)
            row = await uow.get(PRODUCTS, code=code)
            if row is None:
                raise Refused("not_found", "product_not_found", "no such service product", "code")
            require(p, Perm.PROGRAMS_WRITE, Place(row["legal_entity"]))
            before = product_view(row)
            merged = {**before, **changes}
            product = model.ServiceProduct(
                code=code,
                name=merged["name"],
                uses=merged["uses"],
                price_fen=merged["price_fen"],
                validity_months=merged["validity_months"],
                stores=frozenset(merged["stores"]),
                refund_policy=RefundPolicy(merged["refund_policy"]),
                refund_fee_fen=merged["refund_fee_fen"],
                single_use_price_fen=merged["single_use_price_fen"],
                refund_after_expiry=merged["refund_after_expiry"],
            )
            kept = None if "price_fen" in changes else before["price_fen"]
            model.check_product(product, kept_price=kept)
            await _check_stores(uow, row["legal_entity"], product.stores)
            stored = {
                "name": product.name,
                "definition": definition_of(product),
                "state": merged["state"],
                "updated_at_ms": now,
            }
            await uow.update(PRODUCTS, {"code": code}, stored)
            after = product_view({**row, **stored})
            await uow.audit(
                p, action="service_product.update", kind="service_product", object_id=code,
                place=Place(row["legal_entity"]), before=before, after=after, now_ms=now,
            )  # fmt: skip
        return after

    async def _product_row(self, code: str, field: str) -> dict[str, Any]:
        async with self.records.read() as uow:
            row = await uow.get(PRODUCTS, code=code)
        if row is None:
            raise Refused("not_found", "product_not_found", "no such service product", field)
        return row

    # --- selling a package at the counter ---------------------------------------------------

    async def sell(
        self,
        p: Principal,
        card_id: int,
        *,
        product_code: str,
        tender: str,
        receipt: str,
        key: str,
        store: str | None = None,
    ) -> dict[str, Any]:
        """A package of `product_code` sold onto the card at the counter, paid in cash or by
        bank card; idempotent by `key` within the selling store."""
        card = await self._card_for(p, card_id, Perm.SERVICES_SELL)
        counter = await self._counter(p, store, card)
        if tender not in TENDERS:
            raise Refused("invalid", "invalid_value", f"tender is one of {TENDERS}", "tender")
        row = await self._product_row(product_code, "product")
        product = product_of(row)
        sale_key = _sale_key(counter.store, key)
        known = await self._package_by_sale_key(sale_key)
        if known is not None:
            return await self._sale_replay(known, card, product, counter, key, tender=tender)
        ledger_key = _ledger_sale_key(counter.store, key)
        if await self._keyed(_undo_key(ledger_key)) is not None:
            raise _undone()
        self._check_sellable(row, product, card, counter)
        await self._check_grant(counter.store, product.code, product.price_fen)
        if await self._usable_count(int(card["account_id"])) >= (
            limits.SERVICE_ENTITLEMENTS_PER_CARD_MAX
        ):
            raise Refused(
                "conflict", "service_too_many_packages",
                f"a card holds at most {limits.SERVICE_ENTITLEMENTS_PER_CARD_MAX} packages",
            )  # fmt: skip
        op = await self._sale_op(
            p, counter, amount=product.price_fen, tender=tender, receipt=receipt, key=ledger_key
        )
        result = await self._submit_one(op)
        _ledger_ok(result)
        try:
            # Under the card account's lock, which a close and a member's delete hold while
            # they check for packages: none is sold onto a card they are closing.
            async with self.accounts.lock(int(card["account_id"])):
                view = await self._write_sale(
                    p, card, product=product, counter=counter, sale_key=sale_key,
                    receipt=receipt,
                )  # fmt: skip
        except _Raced as raced:
            return await self._sale_replay(raced.row, card, product, counter, key, tender=tender)
        except Exception:
            if await self._undo(op):  # the money went back and the key is spent: say so
                raise _undone() from None
            raise
        assert result.transfer_id is not None
        return {**view, "transfer_id": result.transfer_id, "replayed": False}

    async def packages_held(self, holders: Sequence[int]) -> dict[int, int]:
        """How many usable packages (active, unexpired, a use left) each holder (a card's
        value account) has: a card holding some is not closed, nor its member deleted, while
        they are (the customer paid for them)."""
        return {holder: await self._usable_count(holder) for holder in holders}

    async def _usable_count(self, holder: int) -> int:
        """The holder's usable packages (active, unexpired, a use left): what the cap counts
        (a used-up, expired or refunded package no longer does)."""
        async with self.records.read() as uow:
            return await uow.count(
                PACKAGES, holder=holder, state="active",
                at_least={"uses_left": 1, "expires_ms": self.clock_ms() + 1},
            )  # fmt: skip

    def _check_sellable(
        self,
        row: dict[str, Any],
        product: model.ServiceProduct,
        card: dict[str, Any],
        counter: Place,
    ) -> None:
        if row["state"] != "active":
            raise Refused("conflict", "product_retired", "the product is retired", "product")
        if row["legal_entity"] != counter.entity:
            raise Refused(
                "conflict", "product_other_entity",
                "the product is sold by stores of its own legal entity", "product",
            )  # fmt: skip
        if product.stores and counter.store not in product.stores:
            raise Refused(
                "conflict", "product_not_in_store", "the product is not sold in this store",
                "store",
            )  # fmt: skip
        if card["state"] != CardState.ACTIVE:
            raise Refused("conflict", "card_state", f"the card is {card['state']}")
        if expired(card["expires"], self.clock_ms()):
            raise Refused("conflict", "card_expired", "the card has expired")

    async def _write_sale(
        self,
        p: Principal,
        card: dict[str, Any],
        *,
        product: model.ServiceProduct,
        counter: Place,
        sale_key: str,
        receipt: str,
    ) -> dict[str, Any]:
        now = self.clock_ms()
        sold = model.sell(product, sold_ms=now, tz=self.tz)
        row = {
            "product": product.code,
            "holder": int(card["account_id"]),
            "member_id": card["member_id"],
            "store": counter.store,
            "uses_total": sold.uses_total,
            "uses_left": sold.uses_left,
            "price_fen": sold.price_fen,
            **terms_columns(sold.refund_terms),
            "stores": stores_text(sold.stores),
            "sold_ms": sold.sold_ms,
            "expires_ms": sold.expires_ms,
            "state": str(sold.state),
            "sale_key": sale_key,
            "refund_key": None,
            "refunded_fen": 0,
            "updated_at_ms": now,
        }
        try:
            async with self.records.begin() as uow:
                await _touch(uow, CARDS, id=int(card["id"]))
                fresh = await uow.get(CARDS, id=int(card["id"]))
                if fresh is None or fresh["state"] != CardState.ACTIVE:
                    raise Refused("conflict", "card_state", "the card changed meanwhile")
                if await uow.get(PACKAGES, sale_key=sale_key) is not None:
                    _raise(Conflict(PACKAGES))
                await self.org.use_grant(
                    uow, counter.store, Function.SERVICE, product.code, count=1,
                    amount=product.price_fen,
                )  # fmt: skip
                package_id = await uow.insert(PACKAGES, row)
                assert package_id is not None
                view = {**package_view({**row, "id": package_id}, now), "card_id": card["id"]}
                await uow.audit(
                    p, action="service_package.sell", kind="service_package",
                    object_id=package_id, place=counter, before=None,
                    after={**view, "receipt": receipt}, now_ms=now,
                )  # fmt: skip
        except Conflict:
            found = await self._package_by_sale_key(sale_key)
            if found is None:
                raise
            raise _Raced(found) from None
        return view

    async def _sale_replay(
        self,
        row: dict[str, Any],
        card: dict[str, Any],
        product: model.ServiceProduct,
        counter: Place,
        key: str,
        *,
        tender: str,
    ) -> dict[str, Any]:
        """The same sale again: the stored package, if the request is the same one (the
        card, the product and the tender it was paid with)."""
        transfer = await self._keyed(_ledger_sale_key(counter.store, key))
        paid_from = None
        if transfer is not None:
            till = await self._store_account(counter, tender)
            legs = json.loads(transfer["postings"])
            paid_from = next(a for a, side, _ in legs if side == "debit")
        if (
            row["holder"] != card["account_id"]
            or row["product"] != product.code
            or (paid_from is not None and paid_from != till)
        ):
            raise Refused(
                "conflict", "idempotency_key_reused", "the key was used for another sale", "key"
            )
        view = {**package_view(row, self.clock_ms()), "card_id": card["id"]}
        return {**view, "transfer_id": None if transfer is None else int(transfer["id"]),
                "replayed": True}  # fmt: skip

    async def _sale_op(
        self, p: Principal, counter: Place, *, amount: int, tender: str, receipt: str, key: str
    ) -> CreateTransfer:
        till = await self._store_account(counter, tender)
        sales = await self._store_account(counter, "sales")
        return CreateTransfer(
            client=COUNTER_CLIENT,
            key=key,
            asset=CURRENCY,
            postings=(Posting(till, Side.DEBIT, amount), Posting(sales, Side.CREDIT, amount)),
            reason=SALE_REASON,
            metadata=metadata(counter.store, p.user, receipt),
        )

    async def _check_grant(self, store: str, product: str, amount: int) -> None:
        """Whether the grant would let this sale happen, spending nothing (the real spend
        happens with the package); it keeps a refused sale from touching the ledger."""
        try:
            async with self.records.begin() as uow:
                await _touch(uow, PRODUCTS, code="")
                await self.org.use_grant(uow, store, Function.SERVICE, product, count=1,
                                         amount=amount)  # fmt: skip
                _raise(_DryRun())
        except _DryRun:
            return

    async def _undo(self, op: CreateTransfer) -> bool:
        """Give back a sale whose package could not be written (its key is then spent);
        False when the ledger did not take the reversal (a resend of the sale then finds
        its money taken and writes the package)."""
        result = await self._submit_one(
            Reverse(
                client=COUNTER_CLIENT,
                key=_undo_key(op.key),
                target_key=op.key,
                reason="service_sale_undone",
                metadata=op.metadata,
            )
        )
        if not result.ok:
            log.error("a service sale could not be undone", extra={"code": result.code})
        return result.ok

    async def list_packages(self, p: Principal, card_id: int) -> list[dict[str, Any]]:
        """The card's packages (its value account's, so a replaced card's carry over),
        newest first: every usable one (at most the cap) and the newest of the others (used
        up, expired, refunded; at most the cap of any state), so no live package falls out
        of view behind old ones."""
        card = await self._card_for(p, card_id, Perm.LOYALTY_READ)
        now = self.clock_ms()
        holder, cap = int(card["account_id"]), limits.SERVICE_ENTITLEMENTS_PER_CARD_MAX
        async with self.records.read() as uow:
            usable = await uow.find(
                PACKAGES, {"holder": holder, "state": "active"}, descending=True, limit=cap,
                at_least={"uses_left": 1, "expires_ms": now + 1},
            )  # fmt: skip
            newest = await uow.find(PACKAGES, {"holder": holder}, descending=True, limit=cap)
            known = await with_terms(uow, [*usable[:cap], *newest[:cap]])
        rows = {int(r["id"]): r for r in known}
        return [
            {**package_view(rows[i], now), "card_id": card_id} for i in sorted(rows, reverse=True)
        ]

    # --- refunds -------------------------------------------------------------------------------

    async def refund(
        self, p: Principal, package_id: int, *, key: str, receipt: str
    ) -> dict[str, Any]:
        """Refund the unused entitlements of a package at the store that sold it, by the
        refund terms it was sold under (not the product's today): the package is refunded
        first, then the money leaves the store's sales for its till. Idempotent by `key`
        (the first answer again, whoever asks and with whatever receipt). A refunded package
        whose uses a reversal gave back since may be refunded again, under a new key: the
        difference its terms owe now (`model.refund_rest_of`), once; else it is refused."""
        require(p, Perm.SERVICES_SELL)
        row = await self._package(package_id)
        store = await self.org.store_place(row["store"], "package_id")
        require(p, Perm.SERVICES_SELL, store)
        ledger_key = _ledger_refund_key(package_id, key)
        known = await self._keyed(ledger_key)
        if known is not None:  # paid under this key: that refund's answer
            return self._refund_answer(row, _paid_fen(known), int(known["id"]), replayed=True)
        if row["state"] == EntitlementState.REFUNDED and row["refund_key"] == key:
            # Marked under this key, not paid (the ledger was unavailable) or paid nothing.
            owed = int(row["refunded_fen"]) - await self._refunded_before(package_id)
            return await self._pay_refund(p, row, store, ledger_key, receipt, owed,
                                          replayed=True)  # fmt: skip
        earlier = await self._refund_marked(package_id, key)
        if earlier is not None:  # an earlier refund under this key that paid nothing
            return self._refund_answer(row, earlier, None, replayed=True)
        now = self.clock_ms()
        e = entitlement_of(row)
        before_fen = int(row["refunded_fen"])
        if e.state is EntitlementState.REFUNDED:
            await self._refuse_unpaid(package_id, row)
            amount = model.refund_rest_of(e, before_fen)
        else:
            amount = model.refund_of(e, now)
        async with self.records.begin() as uow:
            changes = {"state": str(EntitlementState.REFUNDED), "refund_key": key,
                       "refunded_fen": before_fen + amount, "updated_at_ms": now}  # fmt: skip
            changed = await uow.update(
                PACKAGES,
                {"id": package_id, "state": row["state"], "uses_left": row["uses_left"],
                 "refund_key": row["refund_key"], "refunded_fen": before_fen},
                changes,
            )  # fmt: skip
            if not changed:
                message = "the package changed meanwhile (a use or a refund); retry"
                raise Refused("conflict", "package_changed", message)
            await uow.audit(
                p, action="service_package.refund", kind="service_package",
                object_id=package_id, place=store, before=package_view(row, now),
                after={**package_view({**row, **changes}, now), "receipt": receipt,
                       "refund_fen": amount, "refund_key": key},
                now_ms=now,
            )  # fmt: skip
        return await self._pay_refund(p, {**row, **changes}, store, ledger_key, receipt, amount,
                                      replayed=False)  # fmt: skip

    async def _refuse_unpaid(self, package_id: int, row: dict[str, Any]) -> None:
        """409 `refund_pending` while the package's latest refund was marked and not paid
        (the ledger did not take it): a new refund would count that unpaid amount as paid.
        Its own key's retry pays it first."""
        owed = int(row["refunded_fen"]) - await self._refunded_before(package_id)
        if (
            owed > 0
            and await self._keyed(_ledger_refund_key(package_id, row["refund_key"])) is None
        ):
            raise Refused(
                "conflict", "refund_pending",
                f"the refund under key {row['refund_key']} is not paid yet: send it again first",
                "key",
            )  # fmt: skip

    async def _refund_marked(self, package_id: int, key: str) -> int | None:
        """What an earlier refund of the package marked under `key` refunded (its audit
        row), or None: a key that paid nothing leaves no transfer to find it by."""
        async with self.records.read() as uow:
            rows = await uow.find(
                "org_audit_log", {"object_kind": "service_package", "object_id": str(package_id),
                                  "action": "service_package.refund"},
                descending=True, limit=limits.SERVICE_REFUNDS_READ_MAX,
            )  # fmt: skip
        for row in rows:
            after = json.loads(row["after"] or "{}")
            if after.get("refund_key") == key:
                return int(after["refund_fen"])
        return None

    async def _refunded_before(self, package_id: int) -> int:
        """What the package's refunds had refunded before its latest one: the `refunded_fen`
        of the image before its newest refund audit row (written with that refund's mark)."""
        async with self.records.read() as uow:
            rows = await uow.find(
                "org_audit_log", {"object_kind": "service_package", "object_id": str(package_id),
                                  "action": "service_package.refund"},
                descending=True, limit=1,
            )  # fmt: skip
        if not rows or rows[0]["before"] is None:
            return 0
        return int(json.loads(rows[0]["before"])["refunded_fen"])

    async def _pay_refund(  # noqa: PLR0917 - the refund's parts, one each
        self,
        p: Principal,
        row: dict[str, Any],
        store: Place,
        ledger_key: str,
        receipt: str,
        amount: int,
        *,
        replayed: bool,
    ) -> dict[str, Any]:
        transfer_id = None
        if amount > 0:
            sales = await self._store_account(store, "sales")
            till = await self._store_account(store, "cash")
            result = await self._submit_one(
                CreateTransfer(
                    client=COUNTER_CLIENT,
                    key=ledger_key,
                    asset=CURRENCY,
                    postings=(Posting(sales, Side.DEBIT, amount),
                              Posting(till, Side.CREDIT, amount)),
                    reason=REFUND_REASON,
                    metadata=metadata(store.store, p.user, receipt),
                )
            )  # fmt: skip
            known = None if result.ok else await self._keyed(ledger_key)
            if known is not None:  # paid at this moment by the same key from another caller
                return self._refund_answer(row, _paid_fen(known), int(known["id"]), replayed=True)
            _ledger_ok(result)
            transfer_id = result.transfer_id
        return self._refund_answer(row, amount, transfer_id, replayed=replayed)

    def _refund_answer(
        self, row: dict[str, Any], amount: int, transfer_id: int | None, *, replayed: bool
    ) -> dict[str, Any]:
        view = package_view(row, self.clock_ms())
        return {**view, "refund_fen": amount, "transfer_id": transfer_id, "replayed": replayed}

    async def _package(self, package_id: int) -> dict[str, Any]:
        async with self.records.read() as uow:
            row = await uow.get(PACKAGES, id=package_id)
            known = [] if row is None else await with_terms(uow, [row])
        if not known:
            raise Refused("not_found", "package_not_found", "no such service package",
                          "package_id")  # fmt: skip
        return known[0]

    # --- the POS --------------------------------------------------------------------------------

    async def redeem(self, r: PosRequest, t: PosTerminal, key: str, card: Card | None) -> PosResult:
        """`r.uses` (default 1) entitlements of the card's package of `r.product` ("" = the
        package the rules choose among all) used at the terminal's store, once per POS key.
        The packages' own terms decide (their stores, expiry, uses); no product is read,
        except for a package that did not record them all (`with_terms`)."""
        if card is None:
            return PosResult(Outcome.BAD_REQUEST)
        uses = r.uses or 1
        now = self.clock_ms()
        async with self.records.read() as uow:
            stored = await uow.get(REDEMPTIONS, key=key)
            if stored is not None:
                return _replayed(stored)
            if await reversed_before_arrival(uow, key):
                return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL)
        # A take lost to another terminal reads the card's packages again and chooses again
        # (another package may still have uses), a bounded number of times.
        for _ in range(limits.SERVICE_REDEEM_ATTEMPTS_MAX):
            chosen, refusal = await self._choose(card, r.product, store=t.store, now_ms=now,
                                                 uses=uses)  # fmt: skip
            if chosen is None:
                return _refused(refusal)
            try:
                left = await self._take(chosen.id, uses, key=key, t=t, now_ms=now)
            except (Conflict, _Lost) as exc:
                # The same request at the same moment (its answer), or another terminal took
                # the uses first (choose again).
                async with self.records.read() as uow:
                    stored = await uow.get(REDEMPTIONS, key=key)
                if stored is not None:
                    return _replayed(stored)
                if isinstance(exc, _Lost):
                    continue
                return PosResult(Outcome.UNAVAILABLE)
            return PosResult(Outcome.APPROVED, uses_left=left)
        return PosResult(Outcome.UNAVAILABLE)  # lost every attempt: the terminal may retry

    async def _choose(
        self, card: Card, product: str, *, store: str, now_ms: int, uses: int
    ) -> tuple[Entitlement | None, str]:
        """The package a redemption uses, read now: of the card's usable packages (active,
        unexpired, a use left; at most the cap of them, expiring first); when none fits, the
        refusal of the newest ones of the product asked (else of any), of any state."""
        cap = limits.SERVICE_ENTITLEMENTS_PER_CARD_MAX
        async with self.records.read() as uow:
            rows = await uow.find(
                PACKAGES, {"holder": card.account_id, "state": "active"}, order="expires_ms",
                limit=cap, at_least={"uses_left": 1, "expires_ms": now_ms + 1},
            )  # fmt: skip
            rows = await with_terms(uow, rows[:cap])
        usable = [entitlement_of(row) for row in rows]
        chosen, _ = _choose_among(usable, product, store=store, now_ms=now_ms, uses=uses)
        if chosen is not None:
            return chosen, ""
        mine = {"holder": card.account_id} | ({"product": product} if product else {})
        async with self.records.read() as uow:
            rows = await uow.find(PACKAGES, mine, descending=True, limit=cap)
            rows = await with_terms(uow, rows[:cap])
        return _choose_among(
            [entitlement_of(row) for row in rows], product, store=store, now_ms=now_ms,
            uses=uses,
        )  # fmt: skip

    async def _take(self, package_id: int, uses: int, *, key: str, t: PosTerminal,
                    now_ms: int) -> int:  # fmt: skip
        """Take the uses by the guarded update and record the redemption under its POS key,
        in one transaction; the uses left after it. _Lost when the guard matched no row."""
        async with self.records.begin() as uow:
            if not await take_uses(uow, package_id, uses, now_ms=now_ms):
                _raise(_Lost())
            after = await uow.get(PACKAGES, id=package_id)
            assert after is not None
            left = int(after["uses_left"])
            await uow.insert(REDEMPTIONS, {
                "key": key, "entitlement": package_id, "uses": uses, "uses_left_after": left,
                "store": t.store, "terminal": t.tid, "reversed": False, "created_at_ms": now_ms,
            })  # fmt: skip
        return left

    async def reverse(self, t: PosTerminal, key: str) -> None:
        """Give back the uses a redemption under `key` took, exactly once. When nothing was
        redeemed under it (yet), a reversed row with no package stands there instead: a
        redemption arriving later conflicts on the key and takes nothing."""
        now = self.clock_ms()
        try:
            async with self.records.begin() as uow:
                stored = await uow.get(REDEMPTIONS, key=key)
                if stored is None:
                    await uow.insert(REDEMPTIONS, {
                        "key": key, "entitlement": 0, "uses": 0, "uses_left_after": 0,
                        "store": t.store, "terminal": t.tid, "reversed": True,
                        "created_at_ms": now,
                    })  # fmt: skip
                    return
                if stored["reversed"]:
                    return
                changed = await uow.update(
                    REDEMPTIONS, {"key": key, "reversed": False}, {"reversed": True}
                )
                if changed:
                    await give_back_uses(
                        uow, int(stored["entitlement"]), int(stored["uses"]), now_ms=now
                    )
        except Conflict:  # the redemption itself landed at this moment: undo it now
            await self.reverse(t, key)

    # --- helpers -------------------------------------------------------------------------------

    async def _package_by_sale_key(self, sale_key: str) -> dict[str, Any] | None:
        async with self.records.read() as uow:
            row = await uow.get(PACKAGES, sale_key=sale_key)
            known = [] if row is None else await with_terms(uow, [row])
        return known[0] if known else None

    async def _keyed(self, key: str) -> dict[str, Any] | None:
        async with self.records.read() as uow:
            return await uow.get("ledger_transfers", client=COUNTER_CLIENT, key=key)

    async def _card_for(self, p: Principal, card_id: int, perm: Perm) -> dict[str, Any]:
        require(p, perm)
        async with self.records.read() as uow:
            row = await uow.get(CARDS, id=card_id)
        if row is None:
            raise Refused("not_found", "card_not_found", "no such card", "card_id")
        require(p, perm, place_of(row))
        return row

    async def _counter(self, p: Principal, store: str | None, card: dict[str, Any]) -> Place:
        """The store selling: the one named, else the caller's own, else the card's."""
        name = store or p.store or card["store"]
        place = await self.org.store_place(name, open_=True)
        require(p, Perm.SERVICES_SELL, place)
        return place

    async def _ensure_currency(self) -> None:
        if not self._currency_ready:
            try:
                await admin.ensure_currency(self.ledger)
            except (Busy, LedgerUnavailable) as exc:
                raise ServicesUnavailable("the ledger cannot take the change now") from exc
            self._currency_ready = True

    async def _store_account(self, place: Place, purpose: str) -> int:
        await self._ensure_currency()
        try:
            return await self.accounts.store(place.entity, place.store, purpose)
        except (AccountsUnavailable, Busy, LedgerUnavailable) as exc:
            raise ServicesUnavailable("the ledger cannot make the store's account now") from exc

    async def _submit_one(self, op: Op) -> Result:
        try:
            [result] = await self.ledger.submit([op])
        except (Busy, LedgerUnavailable) as exc:
            raise ServicesUnavailable("the ledger cannot take the change now; retry") from exc
        return result


class _Raced(Exception):
    """The same sale was written by another request at the same moment."""

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__("raced")
        self.row = row


class _Lost(Exception):
    """A guarded update matched no row: another request took the uses first."""


def _choose_among(
    packages: list[Entitlement], product: str, *, store: str, now_ms: int, uses: int
) -> tuple[Entitlement | None, str]:
    """`choose_package` of the product asked ("" = every product among `packages`)."""
    codes = {e.product_code for e in packages if not product or e.product_code == product}
    return choose_package(packages, codes, store=store, now_ms=now_ms, uses=uses)


def choose_package(
    packages: list[Entitlement],
    products: Collection[str],
    *,
    store: str,
    now_ms: int,
    uses: int,
) -> tuple[Entitlement | None, str]:
    """The package of one of `products` (codes) to use (the model's choice among those
    their own terms let redeem here), or None and the refusal of the package the model
    would have chosen (else of the newest)."""
    mine = [e for e in packages if e.product_code in products]
    if not mine:
        return None, NO_PACKAGE
    ok = [e for e in mine if model.check_redeem(e, store=store, now_ms=now_ms, uses=uses) is None]
    picks = [
        found
        for code in sorted({e.product_code for e in ok})
        if (found := model.choose_entitlement(ok, code, now_ms)) is not None
    ]
    if picks:
        return min(picks, key=lambda e: (e.expires_ms, e.sold_ms, e.id)), ""
    best = [
        found
        for code in sorted({e.product_code for e in mine})
        if (found := model.choose_entitlement(mine, code, now_ms)) is not None
    ]
    blame = min(best, key=lambda e: (e.expires_ms, e.sold_ms, e.id)) if best else mine[0]
    refusal = model.check_redeem(blame, store=store, now_ms=now_ms, uses=uses)
    return None, refusal or model.NO_USES_LEFT


async def reversed_before_arrival(uow: Unit, key: str) -> bool:
    """Whether the terminal reversed this POS key before its request arrived: the ledger
    keeps a tombstone under the key, and a late original must change nothing."""
    found = await uow.get("ledger_failures", client=POS_CLIENT, key=key)
    return found is not None and found["code"] == TOMBSTONE_CODE


def _raise(exc: Exception) -> NoReturn:
    """Leave a transaction by `exc`, rolling it back."""
    raise exc


def _refused(code: str) -> PosResult:
    return PosResult(_OUTCOME_OF_REFUSAL.get(code, Outcome.NOT_PERMITTED), refusal=code)


def _replayed(stored: dict[str, Any]) -> PosResult:
    """The stored answer of a redemption resent; one reversed since is not approved again."""
    if stored["reversed"]:
        return PosResult(Outcome.REVERSED_BEFORE_ARRIVAL, replayed=True)
    return PosResult(Outcome.APPROVED, uses_left=int(stored["uses_left_after"]), replayed=True)


async def _touch(uow: Unit, table: str, **where: Any) -> None:
    """Write first (the write lock on SQLite, a row lock on PostgreSQL), then read."""
    await uow.update(table, where, {"updated_at_ms": ("+", 0)})


async def _check_stores(uow: Unit, entity: str, stores: frozenset[str]) -> None:
    if not stores:
        return
    rows = await uow.find(STORES, {"id": sorted(stores)}, limit=limits.SERVICE_STORES_MAX)
    found = {row["id"]: row for row in rows}
    for store in sorted(stores):
        if store not in found:
            raise Refused("not_found", "store_not_found", f"no store {store}", "stores")
        if found[store]["legal_entity"] != entity:
            raise Refused("invalid", "store_other_entity",
                          f"store {store} is not of legal entity {entity}", "stores")  # fmt: skip


def _require_hq(p: Principal) -> None:
    if p.scope.kind is ScopeKind.STORE:
        raise Refused("forbidden", "scope_forbidden", "service products are defined by HQ")


def _undone() -> Refused:
    return Refused(
        "conflict", "service_sale_undone",
        "a sale under this key was undone; use a new key", "key",
    )  # fmt: skip


def _paid_fen(transfer: dict[str, Any]) -> int:
    """The fen a refund transfer (a `ledger_transfers` row) paid: its one debit."""
    [debit, _] = json.loads(transfer["postings"])
    return int(debit[2])


def _ledger_ok(result: Result) -> None:
    """Refuse (409) with a stable code when the ledger refused a counter transfer."""
    if result.ok:
        return
    if result.code.startswith("exists_with_different_"):
        raise Refused(
            "conflict", "idempotency_key_reused", "the key was used for another request", "key"
        )
    code = result.original_code if result.code == "id_already_failed" else result.code
    raise Refused("conflict", "ledger_refused", f"the ledger refused: {code}")


async def take_uses(uow: Unit, entitlement_id: int, uses: int, *, now_ms: int) -> int:
    """Take `uses` of an active, unexpired package that has at least that many left, by one
    guarded UPDATE (two terminals taking the last use: one row changes, the other none).
    How many rows changed (0 or 1)."""
    return await uow.update(
        PACKAGES, {"id": entitlement_id, "state": "active"},
        {"uses_left": ("+", -uses), "updated_at_ms": now_ms},
        at_least={"uses_left": 0, "expires_ms": now_ms + 1},
    )  # fmt: skip


async def give_back_uses(uow: Unit, entitlement_id: int, uses: int, *, now_ms: int) -> int:
    """Give back `uses` (a reversed redemption), never past the package's total (which a
    package never changes). How many rows changed (0 or 1)."""
    package = await uow.get(PACKAGES, id=entitlement_id)
    if package is None:
        return 0
    return await uow.update(
        PACKAGES, {"id": entitlement_id},
        {"uses_left": ("+", uses), "updated_at_ms": now_ms},
        at_most={"uses_left": int(package["uses_total"])},
    )  # fmt: skip
