"""The ledger API's JSON shapes: strict parsing of requests, rendering of results. Pure.

Every bad input raises `RequestError` with a stable code and the path of the field at fault
(`ops[3].postings[0].amount`); nothing is applied when a request fails to parse. Clients (the
gateway's ledger adapter, the benchmark) build requests with `encode_op`, so both sides speak
through this one module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from cardcore import limits
from cardcore.ledger import codes
from cardcore.ledger.model import (
    LEDGER_CLIENT,
    METADATA_NAMES,
    Account,
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    KeyedOp,
    Metadata,
    Op,
    Posting,
    PostPending,
    Refund,
    Result,
    Reverse,
    SetAccountFrozen,
    Side,
    VoidPending,
)

CLIENT_RE = re.compile(r"[A-Za-z0-9._-]+")
KEY_RE = re.compile(r"[A-Za-z0-9._:/+=-]+")
NAME_RE = re.compile(r"[A-Za-z0-9._:-]+")
ASSET_RE = re.compile(r"[A-Z0-9._:-]+")
REASON_RE = re.compile(r"[A-Za-z0-9._:-]*")
_CHARS_MAX = {
    CLIENT_RE: limits.CLIENT_CHARS_MAX,
    KEY_RE: limits.KEY_CHARS_MAX,
    NAME_RE: limits.NAME_CHARS_MAX,
    ASSET_RE: limits.ASSET_CODE_CHARS_MAX,
    REASON_RE: limits.REASON_CHARS_MAX,
}
# Control characters, line separators and lone surrogates (JSON "\ud800" is not UTF-8).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

DEFAULT_CLIENT = "default"


class RequestError(ValueError):
    def __init__(self, code: str, field: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message


class _Fields:
    """Reads one JSON object, refusing unknown names and wrong types."""

    def __init__(self, value: object, path: str, allowed: frozenset[str]) -> None:
        if not isinstance(value, dict):
            raise RequestError("wrong_type", path or None, "expected a JSON object")
        if not allowed.issuperset(value):
            unknown = min(set(value) - allowed)
            raise RequestError("unknown_field", _join(path, unknown), "field is not allowed")
        self.value: dict[str, Any] = value
        self.path = path

    def at(self, name: str) -> str:
        return _join(self.path, name)

    def raw(self, name: str, required: bool) -> object:
        value = self.value.get(name)
        if value is None and required:
            raise RequestError("missing_field", self.at(name), "field is required")
        return value

    def integer(self, name: str, *, low: int, high: int, required: bool = True) -> int | None:
        value = self.raw(name, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError("wrong_type", self.at(name), "expected an integer")
        if value < low:
            code = "amount_must_be_positive" if "amount" in name else "value_too_small"
            raise RequestError(code, self.at(name), f"must be at least {low}")
        if value > high:
            code = "amount_too_large" if "amount" in name else "value_too_large"
            raise RequestError(code, self.at(name), f"must be at most {high}")
        return value

    def boolean(self, name: str, *, required: bool = False) -> bool | None:
        value = self.raw(name, required)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise RequestError("wrong_type", self.at(name), "expected true or false")
        return value

    def string(self, name: str, pattern: re.Pattern[str], *, required: bool = True) -> str | None:
        value = self.raw(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise RequestError("wrong_type", self.at(name), "expected a string")
        if not value and not pattern.fullmatch(value):
            raise RequestError("empty_string", self.at(name), "must not be empty")
        limit = _CHARS_MAX[pattern]
        if len(value) > limit:
            raise RequestError("string_too_long", self.at(name), f"at most {limit} characters")
        if not pattern.fullmatch(value):
            raise RequestError("invalid_characters", self.at(name), f"must match {pattern.pattern}")
        return value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --- requests ------------------------------------------------------------------------------

_OP_FIELDS = {
    "create_asset": frozenset({"op", "code", "kind", "scale", "name", "linked"}),
    "create_account": frozenset(
        {"op", "asset", "legal_entity", "owner_kind", "owner_id", "purpose", "flags", "linked"}
    ),
    "set_account_frozen": frozenset(
        {"op", "account_id", "debit_frozen", "credit_frozen", "linked"}
    ),
    "transfer": frozenset(
        {"op", "key", "asset", "postings", "pending", "timeout_s", "reason", "metadata", "linked"}
    ),
    "post_pending": frozenset(
        {"op", "key", "pending_id", "amount", "reason", "metadata", "linked"}
    ),
    "void_pending": frozenset({"op", "key", "pending_id", "reason", "metadata", "linked"}),
    "reverse": frozenset(
        {"op", "key", "target_key", "tombstone", "whole", "reason", "metadata", "linked"}
    ),
    "refund": frozenset({"op", "key", "target_key", "amount", "reason", "metadata", "linked"}),
}
_POSTING_FIELDS = frozenset({"account_id", "side", "amount"})
_SIDES = {"debit": Side.DEBIT, "credit": Side.CREDIT}
FLAG_NAMES = ("no_overdraft", "no_overcredit", "debit_frozen", "credit_frozen")


def parse_ops_request(body: object) -> tuple[str, list[Op]]:
    """`{"client": "...", "ops": [...]}` -> (client, ops)."""
    top = _Fields(body, "", frozenset({"client", "ops"}))
    client = top.string("client", CLIENT_RE, required=False) or DEFAULT_CLIENT
    if client == LEDGER_CLIENT:  # the writer's own name (hold expiries): never a caller's
        raise RequestError("invalid_value", "client", f"{LEDGER_CLIENT!r} is reserved")
    raw_ops = top.raw("ops", True)
    if not isinstance(raw_ops, list):
        raise RequestError("wrong_type", "ops", "expected an array of operations")
    if not raw_ops:
        raise RequestError("too_few_ops", "ops", "at least one operation")
    if len(raw_ops) > limits.REQUEST_OPS_MAX:
        raise RequestError("too_many_ops", "ops", f"at most {limits.REQUEST_OPS_MAX} operations")
    ops = [parse_op(raw, f"ops[{i}]", client) for i, raw in enumerate(raw_ops)]
    if ops[-1].linked:
        raise RequestError(
            "linked_chain_open", f"ops[{len(ops) - 1}].linked", "the last operation cannot link"
        )
    return client, ops


def parse_op(raw: object, path: str, client: str) -> Op:
    if not isinstance(raw, dict):
        raise RequestError("wrong_type", path, "expected a JSON object")
    kind = raw.get("op")
    if not isinstance(kind, str) or kind not in _OP_FIELDS:
        code = "missing_field" if kind is None else "invalid_value"
        code = "wrong_type" if kind is not None and not isinstance(kind, str) else code
        raise RequestError(code, _join(path, "op"), f"one of {sorted(_OP_FIELDS)}")
    f = _Fields(raw, path, _OP_FIELDS[kind])
    linked = bool(f.boolean("linked"))
    if kind == "create_asset":
        return _create_asset(f, linked)
    if kind == "create_account":
        return _create_account(f, linked)
    if kind == "set_account_frozen":
        account_id = _id(f, "account_id")
        debit, credit = f.boolean("debit_frozen"), f.boolean("credit_frozen")
        if debit is None and credit is None:
            raise RequestError("missing_field", f.at("debit_frozen"), "name a flag to change")
        return SetAccountFrozen(account_id, debit, credit, linked)
    key = _str(f, "key", KEY_RE)
    reason = f.string("reason", REASON_RE, required=False) or ""
    metadata = _metadata(f)
    if kind == "transfer":
        return _transfer(f, client, key, reason=reason, metadata=metadata, linked=linked)
    if kind == "reverse":
        target = _str(f, "target_key", KEY_RE)
        if target == key:
            raise RequestError("invalid_value", f.at("target_key"), "a reversal's own key")
        tombstone = bool(f.boolean("tombstone"))
        whole = bool(f.boolean("whole"))
        return Reverse(client, key, target, tombstone, reason, metadata, linked, whole)
    if kind == "refund":
        target = _str(f, "target_key", KEY_RE)
        if target == key:
            raise RequestError("invalid_value", f.at("target_key"), "a refund's own key")
        refund_amount = f.integer("amount", low=1, high=limits.AMOUNT_MAX)
        assert refund_amount is not None
        return Refund(client, key, target, refund_amount, reason, metadata, linked)
    pending_id = _id(f, "pending_id")
    if kind == "post_pending":
        amount = f.integer("amount", low=1, high=limits.AMOUNT_MAX, required=False)
        return PostPending(client, key, pending_id, amount, reason, metadata, linked)
    return VoidPending(client, key, pending_id, reason, metadata, linked)


def _str(f: _Fields, name: str, pattern: re.Pattern[str]) -> str:
    value = f.string(name, pattern)
    assert value is not None
    return value


def _id(f: _Fields, name: str) -> int:
    value = f.integer(name, low=1, high=limits.BALANCE_MAX)
    assert value is not None
    return value


def _create_asset(f: _Fields, linked: bool) -> CreateAsset:
    kind = f.raw("kind", True)
    if not isinstance(kind, str) or kind not in {k.value for k in AssetKind}:
        raise RequestError("invalid_value", f.at("kind"), f"one of {[k.value for k in AssetKind]}")
    scale = f.integer("scale", low=0, high=limits.ASSET_SCALE_MAX)
    assert scale is not None
    name = f.raw("name", True)
    name = _text(name, f.at("name"), limits.NAME_CHARS_MAX)
    return CreateAsset(_str(f, "code", ASSET_RE), AssetKind(str(kind)), scale, name, linked)


def _create_account(f: _Fields, linked: bool) -> CreateAccount:
    flags = AccountFlags()
    raw_flags = f.raw("flags", False)
    if raw_flags is not None:
        ff = _Fields(raw_flags, f.at("flags"), frozenset(FLAG_NAMES))
        flags = AccountFlags(**{name: bool(ff.boolean(name)) for name in FLAG_NAMES})
    return CreateAccount(
        asset=_str(f, "asset", ASSET_RE),
        legal_entity=_str(f, "legal_entity", NAME_RE),
        owner_kind=_str(f, "owner_kind", NAME_RE),
        owner_id=_str(f, "owner_id", NAME_RE),
        purpose=_str(f, "purpose", NAME_RE),
        flags=flags,
        linked=linked,
    )


def _transfer(
    f: _Fields, client: str, key: str, *, reason: str, metadata: Metadata, linked: bool
) -> CreateTransfer:
    asset = _str(f, "asset", ASSET_RE)
    raw = f.raw("postings", True)
    where = f.at("postings")
    if not isinstance(raw, list):
        raise RequestError("wrong_type", where, "expected an array of postings")
    if len(raw) < 2:
        raise RequestError("too_few_postings", where, "a transfer has at least two postings")
    if len(raw) > limits.POSTINGS_PER_TRANSFER_MAX:
        raise RequestError(
            "too_many_postings", where, f"at most {limits.POSTINGS_PER_TRANSFER_MAX} postings"
        )
    postings: list[Posting] = []
    seen: set[int] = set()
    debits = credits = 0
    for i, item in enumerate(raw):
        pf = _Fields(item, f"{where}[{i}]", _POSTING_FIELDS)
        account_id = _id(pf, "account_id")
        raw_side = pf.raw("side", True)
        side = _SIDES.get(raw_side) if isinstance(raw_side, str) else None
        if side is None:
            raise RequestError("invalid_value", pf.at("side"), "debit or credit")
        amount = pf.integer("amount", low=1, high=limits.AMOUNT_MAX)
        assert amount is not None
        if account_id in seen:
            raise RequestError(
                "accounts_must_be_different", pf.at("account_id"), "account appears twice"
            )
        seen.add(account_id)
        postings.append(Posting(account_id, side, amount))
        if side is Side.DEBIT:
            debits += amount
        else:
            credits += amount
    if debits != credits:
        raise RequestError("postings_unbalanced", where, "debits and credits must be equal")
    pending = bool(f.boolean("pending"))
    timeout_s = f.integer("timeout_s", low=1, high=limits.PENDING_TIMEOUT_S_MAX, required=False)
    if timeout_s is not None and not pending:
        raise RequestError("invalid_value", f.at("timeout_s"), "only a pending transfer times out")
    return CreateTransfer(
        client, key, asset, tuple(postings), pending, timeout_s, reason, metadata, linked
    )


def _metadata(f: _Fields) -> Metadata:
    raw = f.raw("metadata", False)
    if raw is None:
        return ()
    mf = _Fields(raw, f.at("metadata"), METADATA_NAMES)
    pairs = []
    for name in sorted(mf.value):
        value = mf.value[name]
        if value is None:
            continue
        pairs.append((name, _text(value, mf.at(name), limits.METADATA_VALUE_CHARS_MAX)))
    return tuple(pairs)


def _text(value: object, where: str, limit: int) -> str:
    if not isinstance(value, str):
        raise RequestError("wrong_type", where, "expected a string")
    if not value or len(value) > limit:
        raise RequestError(
            "string_too_long" if value else "empty_string", where, f"1..{limit} characters"
        )
    if _CONTROL_RE.search(value):
        raise RequestError(
            "invalid_characters", where, "control characters and lone surrogates are not allowed"
        )
    return value


def encode_op(op: Op) -> dict[str, object]:
    """The JSON form of an operation (what `parse_op` reads back)."""
    out: dict[str, object]
    if isinstance(op, CreateAsset):
        out = {
            "op": "create_asset",
            "code": op.code,
            "kind": str(op.kind),
            "scale": op.scale,
            "name": op.name,
        }
    elif isinstance(op, CreateAccount):
        flags = {n: getattr(op.flags, n) for n in sorted(FLAG_NAMES) if getattr(op.flags, n)}
        out = {
            "op": "create_account",
            "asset": op.asset,
            "legal_entity": op.legal_entity,
            "owner_kind": op.owner_kind,
            "owner_id": op.owner_id,
            "purpose": op.purpose,
            "flags": flags,
        }
    elif isinstance(op, SetAccountFrozen):
        out = {"op": "set_account_frozen", "account_id": op.account_id}
        if op.debit_frozen is not None:
            out["debit_frozen"] = op.debit_frozen
        if op.credit_frozen is not None:
            out["credit_frozen"] = op.credit_frozen
    elif isinstance(op, CreateTransfer | PostPending | VoidPending | Reverse | Refund):
        out = _encode_keyed(op)
    else:
        raise TypeError(f"{type(op).__name__} is made by the ledger itself, never sent")
    if op.linked:
        out["linked"] = True
    return out


def _encode_keyed(op: KeyedOp) -> dict[str, object]:
    out: dict[str, object] = {"key": op.key}
    if isinstance(op, CreateTransfer):
        out |= {
            "op": "transfer",
            "asset": op.asset,
            "postings": [
                {"account_id": p.account_id, "side": str(p.side), "amount": p.amount}
                for p in op.postings
            ],
        }
        if op.pending:
            out["pending"] = True
        if op.timeout_s is not None:
            out["timeout_s"] = op.timeout_s
    elif isinstance(op, PostPending):
        out |= {"op": "post_pending", "pending_id": op.pending_id}
        if op.amount is not None:
            out["amount"] = op.amount
    elif isinstance(op, Reverse):
        out |= {"op": "reverse", "target_key": op.target_key}
        if op.tombstone:
            out["tombstone"] = True
        if op.whole:
            out["whole"] = True
    elif isinstance(op, Refund):
        out |= {"op": "refund", "target_key": op.target_key, "amount": op.amount}
    else:
        out |= {"op": "void_pending", "pending_id": op.pending_id}
    if op.reason:
        out["reason"] = op.reason
    if op.metadata:
        out["metadata"] = dict(op.metadata)
    return out


# --- responses -----------------------------------------------------------------------------


def result_json(r: Result) -> dict[str, object]:
    out: dict[str, object] = {"status": "ok" if r.ok else "failed", "code": r.code}
    for name in ("seq", "transfer_id", "account_id", "asset", "field", "original_code"):
        value = getattr(r, name)
        if value is not None:
            out[name] = value
    if not r.ok:
        out["message"] = codes.message(r.original_code or r.code)
    if r.replayed:
        out["replayed"] = True
    return out


def account_json(a: Account) -> dict[str, object]:
    info, b = a.info, a.balance
    return {
        "id": info.id,
        "asset": info.asset,
        "legal_entity": info.legal_entity,
        "owner_kind": info.owner_kind,
        "owner_id": info.owner_id,
        "purpose": info.purpose,
        "flags": {
            "no_overdraft": info.flags.no_overdraft,
            "no_overcredit": info.flags.no_overcredit,
            "debit_frozen": info.flags.debit_frozen,
            "credit_frozen": info.flags.credit_frozen,
        },
        "debits_posted": b.debits_posted,
        "credits_posted": b.credits_posted,
        "debits_pending": b.debits_pending,
        "credits_pending": b.credits_pending,
        "version": b.version,
    }


def entry_json(row: Mapping[str, Any]) -> dict[str, object]:
    return {
        "id": row["id"],
        "seq": row["seq"],
        "transfer_id": row["transfer_id"],
        "transfer_kind": row["transfer_kind"],
        "side": row["side"],
        "posted_delta": row["posted_delta"],
        "pending_delta": row["pending_delta"],
        "debits_posted": row["debits_posted"],
        "credits_posted": row["credits_posted"],
        "debits_pending": row["debits_pending"],
        "credits_pending": row["credits_pending"],
        "version": row["version"],
        "reason": row["reason"],
        "metadata": json.loads(row["metadata"]),
        "created_at_ms": row["created_at_ms"],
    }
