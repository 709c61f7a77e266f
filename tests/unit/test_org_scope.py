"""`scoped_filter`: a listing's filters narrowed to the caller's scope, or nothing at all."""

from __future__ import annotations

from cardcore.org.model import Principal, Role, Scope, ScopeKind, scoped_filter


def _principal(kind: ScopeKind, scope_id: str = "") -> Principal:
    return Principal(1, "u", 1, Role.AUDITOR, Scope(kind, scope_id), "LE1")


def test_the_group_sees_what_it_asks_for() -> None:
    asked = {"store": "S9", "state": "active"}
    assert scoped_filter(_principal(ScopeKind.GROUP), asked) == asked


def test_an_entity_or_a_store_sees_only_its_own_rows() -> None:
    entity, store = _principal(ScopeKind.ENTITY, "LE1"), _principal(ScopeKind.STORE, "S1")
    assert scoped_filter(entity, {"state": "x"}) == {"state": "x", "legal_entity": "LE1"}
    assert scoped_filter(entity, {"legal_entity": "LE2"}) is None
    assert scoped_filter(entity, {}, entity_column="entity") == {"entity": "LE1"}
    assert scoped_filter(store, {"store": "S1"}) == {"store": "S1"}
    assert scoped_filter(store, {"store": "S2"}) is None
    asked = {"store": "S1"}
    scoped_filter(store, asked)
    assert asked == {"store": "S1"}  # the caller's filters are left as they were
