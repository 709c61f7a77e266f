"""Who the group is and who may do what: legal entities, stores, staff roles, scopes and the
permissions of each role. Pure.

A scope is the group (HQ), one legal entity, or one store. An object of the admin API lives at
a place (its legal entity and, for store objects, its store); a principal may act on it only
when its scope covers that place and its role has the permission. Store roles always have a
store scope; HQ roles and auditors have the group or one legal entity.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

GROUP = "group"  # the one HQ; the scope id of a group scope is ""


class Role(enum.StrEnum):
    HQ_ADMIN = "hq_admin"
    HQ_FINANCE = "hq_finance"
    HQ_MARKETING = "hq_marketing"
    STORE_CRM = "store_crm"  # the store's CRM officer: members, cards, rules
    STORE_SUPERVISOR = "store_supervisor"  # the cashier supervisor: counter work, unlocks
    AUDITOR = "auditor"  # reads everything in scope, changes nothing


class ScopeKind(enum.StrEnum):
    GROUP = "group"
    ENTITY = "entity"
    STORE = "store"


class Perm(enum.StrEnum):
    """What a route needs. `*_read` never changes anything."""

    ORG_READ = "org_read"  # legal entities, stores, terminals
    ORG_WRITE = "org_write"
    STAFF_READ = "staff_read"  # staff users and their tokens
    STAFF_WRITE = "staff_write"
    GRANTS_READ = "grants_read"
    GRANTS_WRITE = "grants_write"
    CLASSES_READ = "classes_read"
    CLASSES_WRITE = "classes_write"
    MEMBERS_READ = "members_read"
    MEMBERS_WRITE = "members_write"
    CARDS_READ = "cards_read"
    CARDS_ISSUE = "cards_issue"  # issue, activate, replace, bulk batches
    CARDS_STATE = "cards_state"  # freeze, unfreeze, report lost, unlock PIN
    CARDS_MONEY = "cards_money"  # top up, sell a gift card, close with refund
    CARDS_PAN = "cards_pan"  # see full card numbers (printing exports)
    REPORTS_READ = "reports_read"
    AUDIT_READ = "audit_read"
    # issue 5: points, coupons, service and manager cards
    LOYALTY_READ = "loyalty_read"  # programs, rules, tiers, campaigns, codes, products, balances
    PROGRAMS_WRITE = "programs_write"  # points programs and their tiers; service products
    RULES_WRITE = "rules_write"  # earning rules (a store's own within its grant)
    CAMPAIGNS_WRITE = "campaigns_write"  # coupon campaigns, codes, issuance, signing keys
    POINTS_WRITE = "points_write"  # redeem for rewards, transfer, adjust a member's points
    SERVICES_SELL = "services_sell"  # sell, refund service packages at the counter
    MANAGER_CARDS_WRITE = "manager_cards_write"  # issue, disable manager cards; their PINs


_READ = frozenset(p for p in Perm if p.value.endswith("_read"))

PERMISSIONS: dict[Role, frozenset[Perm]] = {
    Role.HQ_ADMIN: frozenset(Perm),
    Role.HQ_FINANCE: _READ | {Perm.CARDS_MONEY},
    Role.HQ_MARKETING: frozenset(
        {
            Perm.ORG_READ,
            Perm.GRANTS_READ,
            Perm.CLASSES_READ,
            Perm.CLASSES_WRITE,
            Perm.MEMBERS_READ,
            Perm.MEMBERS_WRITE,
            Perm.CARDS_READ,
            Perm.REPORTS_READ,
            Perm.LOYALTY_READ,
            Perm.PROGRAMS_WRITE,
            Perm.RULES_WRITE,
            Perm.CAMPAIGNS_WRITE,
        }
    ),
    Role.STORE_CRM: frozenset(
        {
            Perm.ORG_READ,
            Perm.GRANTS_READ,
            Perm.CLASSES_READ,
            Perm.MEMBERS_READ,
            Perm.MEMBERS_WRITE,
            Perm.CARDS_READ,
            Perm.CARDS_ISSUE,
            Perm.CARDS_STATE,
            Perm.CARDS_MONEY,
            Perm.CARDS_PAN,
            Perm.REPORTS_READ,
            Perm.LOYALTY_READ,
            Perm.RULES_WRITE,
            Perm.CAMPAIGNS_WRITE,
            Perm.POINTS_WRITE,
            Perm.SERVICES_SELL,
        }
    ),
    Role.STORE_SUPERVISOR: frozenset(
        {
            Perm.ORG_READ,
            Perm.CLASSES_READ,
            Perm.MEMBERS_READ,
            Perm.CARDS_READ,
            Perm.CARDS_STATE,
            Perm.CARDS_MONEY,
            Perm.REPORTS_READ,
            Perm.LOYALTY_READ,
            Perm.POINTS_WRITE,
            Perm.SERVICES_SELL,
            Perm.MANAGER_CARDS_WRITE,
        }
    ),
    Role.AUDITOR: _READ,
}

STORE_ROLES = frozenset({Role.STORE_CRM, Role.STORE_SUPERVISOR})


@dataclass(frozen=True, slots=True)
class Scope:
    kind: ScopeKind
    id: str = ""  # the legal entity's or the store's id; "" for the group

    def __str__(self) -> str:
        return "group" if self.kind is ScopeKind.GROUP else f"{self.kind}:{self.id}"


@dataclass(frozen=True, slots=True)
class Place:
    """Where an object lives: its legal entity and, for store objects, its store."""

    entity: str = ""  # "" only for group-wide objects (card classes, entities themselves)
    store: str = ""


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of an admin request, from its bearer token."""

    user_id: int
    user: str
    token_id: int
    role: Role
    scope: Scope
    scope_entity: str  # the legal entity of a store scope (or of an entity scope)

    def can(self, perm: Perm) -> bool:
        return perm in PERMISSIONS[self.role]

    def covers(self, place: Place) -> bool:
        """Whether the scope includes `place`. A group-wide object (no entity) is covered only
        by the group scope for changes; `reads_group_object` decides reads."""
        if self.scope.kind is ScopeKind.GROUP:
            return True
        if self.scope.kind is ScopeKind.ENTITY:
            return bool(place.entity) and place.entity == self.scope.id
        return bool(place.store) and place.store == self.scope.id

    def covers_scope(self, other: Scope, other_entity: str) -> bool:
        """Whether this principal's scope includes all of `other` (a scope it may hand out)."""
        if self.scope.kind is ScopeKind.GROUP:
            return True
        if other.kind is ScopeKind.GROUP:
            return False
        if self.scope.kind is ScopeKind.ENTITY:
            return other_entity == self.scope.id
        return other.kind is ScopeKind.STORE and other.id == self.scope.id

    @property
    def store(self) -> str:
        """The principal's store, when its scope is one store."""
        return self.scope.id if self.scope.kind is ScopeKind.STORE else ""


def require(p: Principal, perm: Perm, place: Place | None = None) -> None:
    """Refuse (403) unless `p` has `perm` and (when given) its scope covers `place`."""
    if not p.can(perm):
        raise Refused("forbidden", "role_forbidden", f"role {p.role} may not {perm}")
    if place is not None and not p.covers(place):
        raise Refused("forbidden", "scope_forbidden", f"outside the token's scope ({p.scope})")


def scoped_filter(
    p: Principal, filters: Mapping[str, Any], *, entity_column: str = "legal_entity"
) -> dict[str, Any] | None:
    """A listing's equality filters narrowed to the principal's scope: an entity's token sees
    its entity's rows, a store's its store's. None when the filters ask for another scope's
    rows (the answer is then empty, never an error that would confirm they exist)."""
    where = dict(filters)
    column = {ScopeKind.ENTITY: entity_column, ScopeKind.STORE: "store"}.get(p.scope.kind)
    if column is None:
        return where
    if where.get(column, p.scope.id) != p.scope.id:
        return None
    where[column] = p.scope.id
    return where


def role_fits_scope(role: Role, scope: Scope) -> bool:
    """Store roles work in one store; HQ roles and auditors in the group or one entity."""
    if role in STORE_ROLES:
        return scope.kind is ScopeKind.STORE
    return scope.kind in (ScopeKind.GROUP, ScopeKind.ENTITY)


# --- names ------------------------------------------------------------------------------------

CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")  # entity, store, class and user codes


class Function(enum.StrEnum):
    """The card's eight functions: what HQ grants a store to issue or sell."""

    STORED_VALUE = "stored_value"
    POINTS = "points"
    GIFT = "gift"
    DISCOUNT = "discount"
    CAMPAIGN = "campaign"
    SERVICE = "service"
    COUPON = "coupon"
    MANAGER = "manager"


@dataclass(frozen=True, slots=True)
class Grant:
    """HQ's permission for a store to issue or sell one function (optionally one product,
    a card class code), with optional budgets and a date range (YYYY-MM-DD, inclusive)."""

    id: int
    store: str
    function: Function
    product: str  # "" = every product of the function
    budget_count: int | None
    budget_amount: int | None
    used_count: int
    used_amount: int
    valid_from: str
    valid_to: str
    state: str  # "active" | "revoked"

    def applies(self, function: Function, product: str, day: str) -> bool:
        return (
            self.state == "active"
            and self.function is function
            and self.product in ("", product)
            and (not self.valid_from or self.valid_from <= day)
            and (not self.valid_to or day <= self.valid_to)
        )

    def room(self, count: int, amount: int) -> bool:
        """Whether the budgets have room for `count` more cards and `amount` more fen."""
        if self.budget_count is not None and self.used_count + count > self.budget_count:
            return False
        return self.budget_amount is None or self.used_amount + amount <= self.budget_amount


# --- refusals -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One fault of a definition the admin API checks (a points rule, a service product): the
    field at fault and what is wrong with it. Checks answer every problem at once."""

    field: str
    message: str


class Refused(Exception):
    """A request the admin services refuse, with nothing changed. `kind` picks the HTTP
    status (invalid 400, forbidden 403, not_found 404, conflict 409); `code` is stable."""

    STATUS: ClassVar[dict[str, int]] = {
        "invalid": 400,
        "forbidden": 403,
        "not_found": 404,
        "conflict": 409,
    }

    def __init__(self, kind: str, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        assert kind in self.STATUS
        self.kind = kind
        self.code = code
        self.message = message
        self.field = field

    @property
    def status(self) -> int:
        return self.STATUS[self.kind]
