"""Signed coupon QR codes: Ed25519 in the vault, the payload and its strict parsing in the
coupon model, and the round trip through both (pure; no I/O)."""

from __future__ import annotations

import base64
import secrets

import pytest

from cardcore import limits
from cardcore.coupons.model import (
    QR_MALFORMED,
    QrClaims,
    new_code,
    new_qr_nonce,
    parse_qr,
    qr_payload,
    qr_text,
)
from cardcore.org.model import Refused
from cardcore.vault import (
    VaultError,
    ed25519_new_private,
    ed25519_public_of,
    ed25519_public_ok,
    ed25519_sign,
    ed25519_verify,
)

PRIVATE = bytes(range(32))  # a fixed key, so the texts below are stable
PUBLIC = ed25519_public_of(PRIVATE)
NONCE = "00112233445566778899aabbccddeeff"
EXPIRY_MS = 1_767_225_600_000
CODE = "0123456789ABCDEY"


def payload(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "code": CODE,
        "issuer_entity": "LE01",
        "expiry_ms": EXPIRY_MS,
        "nonce_hex": NONCE,
        "kid": "le01-2026",
    }
    fields.update(changes)
    return qr_payload("v1", **fields)  # type: ignore[arg-type]


def signed_text(**changes: object) -> str:
    body = payload(**changes)
    return qr_text(body, ed25519_sign(PRIVATE, body))


def malformed(text: str) -> Refused:
    with pytest.raises(Refused) as caught:
        parse_qr(text)
    assert caught.value.code == QR_MALFORMED
    assert caught.value.status == 400
    return caught.value


# --- Ed25519 in the vault ----------------------------------------------------------------------


def test_new_private_keys_are_32_random_bytes() -> None:
    first, second = ed25519_new_private(), ed25519_new_private()
    assert len(first) == len(second) == 32
    assert first != second
    assert len(ed25519_public_of(first)) == 32


def test_a_signature_verifies_under_its_public_key() -> None:
    signature = ed25519_sign(PRIVATE, b"message")
    assert len(signature) == 64
    assert ed25519_verify(PUBLIC, b"message", signature)


def test_a_tampered_message_does_not_verify_negative() -> None:
    signature = ed25519_sign(PRIVATE, b"message")
    assert not ed25519_verify(PUBLIC, b"messagE", signature)
    assert not ed25519_verify(PUBLIC, b"message ", signature)


def test_another_key_does_not_verify_negative() -> None:
    signature = ed25519_sign(PRIVATE, b"message")
    other = ed25519_public_of(ed25519_new_private())
    assert not ed25519_verify(other, b"message", signature)


def test_a_truncated_or_altered_signature_does_not_verify_negative() -> None:
    signature = ed25519_sign(PRIVATE, b"message")
    assert not ed25519_verify(PUBLIC, b"message", signature[:-1])
    assert not ed25519_verify(PUBLIC, b"message", b"")
    assert not ed25519_verify(PUBLIC, b"message", signature + b"\x00")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not ed25519_verify(PUBLIC, b"message", flipped)


def test_bad_keys_and_inputs_answer_false_never_raise_negative() -> None:
    signature = ed25519_sign(PRIVATE, b"message")
    assert not ed25519_verify(PUBLIC[:31], b"message", signature)
    assert not ed25519_verify(b"", b"message", signature)
    assert not ed25519_verify(b"\xff" * 32, b"message", signature)
    assert not ed25519_verify(None, b"message", signature)  # type: ignore[arg-type]
    assert not ed25519_verify(PUBLIC, "message", signature)  # type: ignore[arg-type]


def test_signing_with_a_key_of_the_wrong_size_is_refused_negative() -> None:
    with pytest.raises(VaultError):
        ed25519_sign(PRIVATE[:31], b"message")
    with pytest.raises(VaultError):
        ed25519_public_of(PRIVATE + b"\x00")


# --- the payload -------------------------------------------------------------------------------


def test_payload_is_the_fields_joined_by_bars_in_ascii() -> None:
    assert payload() == f"v1|{CODE}|LE01|{EXPIRY_MS}|{NONCE}|le01-2026".encode()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"code": "AB|CD"}, "code"),
        ({"code": "abcd"}, "code"),
        ({"code": "AB"}, "code"),
        ({"issuer_entity": "LE|01"}, "issuer_entity"),
        ({"issuer_entity": "LE\x0101"}, "issuer_entity"),
        ({"issuer_entity": ""}, "issuer_entity"),
        ({"kid": "k id"}, "kid"),
        ({"kid": "k\u00e9y"}, "kid"),
        ({"expiry_ms": -1}, "expiry_ms"),
        ({"expiry_ms": 1.5}, "expiry_ms"),
        ({"expiry_ms": 10**15}, "expiry_ms"),
        ({"nonce_hex": NONCE[:-1]}, "nonce_hex"),
        ({"nonce_hex": NONCE.upper()}, "nonce_hex"),
        ({"nonce_hex": "g" * 32}, "nonce_hex"),
    ],
)
def test_payload_refuses_fields_out_of_shape_negative(
    changes: dict[str, object], field: str
) -> None:
    with pytest.raises(Refused) as caught:
        payload(**changes)
    assert (caught.value.code, caught.value.field) == (QR_MALFORMED, field)


def test_payload_refuses_an_unknown_version_negative() -> None:
    with pytest.raises(Refused) as caught:
        qr_payload("v2", code=CODE, issuer_entity="LE01", expiry_ms=0, nonce_hex=NONCE, kid="k")
    assert caught.value.field == "version"


def test_new_nonce_is_32_lowercase_hex_from_the_csprng() -> None:
    nonce = new_qr_nonce(secrets.token_bytes)
    assert len(nonce) == 2 * limits.COUPON_QR_NONCE_BYTES
    assert nonce == nonce.lower()
    assert new_qr_nonce(lambda n: bytes(range(n))) == "000102030405060708090a0b0c0d0e0f"


# --- the round trip ----------------------------------------------------------------------------


def test_round_trip_build_sign_text_parse_verify() -> None:
    private = ed25519_new_private()
    code = new_code(secrets.token_bytes)
    body = qr_payload(
        "v1",
        code=code,
        issuer_entity="LE01",
        expiry_ms=EXPIRY_MS,
        nonce_hex=new_qr_nonce(secrets.token_bytes),
        kid="le01-2026",
    )
    text = qr_text(body, ed25519_sign(private, body))
    claims = parse_qr(text)
    assert ed25519_verify(ed25519_public_of(private), claims.payload, claims.signature)
    assert (claims.version, claims.code, claims.issuer_entity) == ("v1", code, "LE01")
    assert claims.payload == body
    assert "=" not in text.rpartition("|")[2]


def test_a_tampered_text_parses_but_does_not_verify_negative() -> None:
    text = signed_text()
    tampered = text.replace("LE01", "LE02", 1)
    claims = parse_qr(tampered)
    assert not ed25519_verify(PUBLIC, claims.payload, claims.signature)
    later = parse_qr(text.replace(str(EXPIRY_MS), str(EXPIRY_MS + 1), 1))
    assert not ed25519_verify(PUBLIC, later.payload, later.signature)


def test_parse_reads_the_expiry_and_nonce() -> None:
    claims = parse_qr(signed_text(expiry_ms=0))
    assert claims.expiry_ms == 0
    assert claims.nonce_hex == NONCE
    claims = parse_qr(signed_text())
    assert isinstance(claims, QrClaims)
    assert claims.expiry_ms == EXPIRY_MS
    assert (claims.kid, claims.issuer_entity) == ("le01-2026", "LE01")


def test_a_qr_is_good_until_its_expiry() -> None:
    claims = parse_qr(signed_text())
    assert not claims.expired(EXPIRY_MS - 1)


def test_a_qr_is_expired_from_its_expiry_negative() -> None:
    claims = parse_qr(signed_text())
    assert claims.expired(EXPIRY_MS)
    assert claims.expired(EXPIRY_MS + 1)


def _swap(text: str, index: int, value: str) -> str:
    fields = text.split("|")
    fields[index] = value
    return "|".join(fields)


GOOD = signed_text()
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
SIGNATURE = GOOD.rpartition("|")[2]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "|",
        SIGNATURE,
        GOOD.rpartition("|")[0],  # no signature
        GOOD + "|" + SIGNATURE,  # a field too many
        _swap(GOOD, 1, ""),
        GOOD.replace(f"|{CODE}|", "|", 1),  # a field too few
        _swap(GOOD, 0, "v2"),
        _swap(GOOD, 0, "V1"),
        _swap(GOOD, 3, "0" + str(EXPIRY_MS)),  # leading zero
        _swap(GOOD, 3, "+" + str(EXPIRY_MS)),
        _swap(GOOD, 3, "1" * 16),
        _swap(GOOD, 3, "\uff11"),  # a full-width digit: isdigit() says yes
        _swap(GOOD, 4, NONCE[:-2]),
        _swap(GOOD, 4, NONCE + "00"),
        _swap(GOOD, 4, NONCE.upper()),
        _swap(GOOD, 5, ""),
        GOOD + "=",  # padding
        GOOD + "==",
        GOOD[:-1],  # a truncated signature
        GOOD[:-4],
        GOOD + "A",
        GOOD[:-1] + "+",  # standard base64, not url
        GOOD[:-1] + "/",
        GOOD[:-1] + B64URL[B64URL.index(GOOD[-1]) ^ 1],  # a spare bit set: not canonical
        GOOD + "\n",
        " " + GOOD,
        GOOD.replace("|", "||", 1),
        "x" * (limits.COUPON_QR_CHARS_MAX + 1),
        GOOD.replace("LE01", "L\u00c901", 1),
    ],
)
def test_parse_refuses_malformed_texts_negative(text: str) -> None:
    malformed(text)


def test_parse_refuses_a_signature_of_the_wrong_size_negative() -> None:
    short = base64.urlsafe_b64encode(bytes(63)).decode().rstrip("=")
    long = base64.urlsafe_b64encode(bytes(65)).decode().rstrip("=")
    body = GOOD.rpartition("|")[0]
    malformed(f"{body}|{short}")
    malformed(f"{body}|{long}")
    assert parse_qr(f"{body}|{base64.urlsafe_b64encode(bytes(64)).decode().rstrip('=')}")


# --- small-order public keys ------------------------------------------------------------------

# The eight small-order points of Edwards25519 (and non-canonical encodings of some): under
# them a fixed signature verifies for messages nobody signed, and OpenSSL does not refuse them.
SMALL_ORDER_KEYS = [
    bytes([1]) + bytes(31),  # the neutral point
    bytes(32),  # order 4
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),  # order 8
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),  # order 8
    bytes.fromhex("ec" + "ff" * 30 + "7f"),  # order 2 (y = p - 1)
    bytes.fromhex("ed" + "ff" * 30 + "7f"),  # y = p: not canonical
    bytes.fromhex("ee" + "ff" * 30 + "7f"),  # y = p + 1: not canonical
]


@pytest.mark.parametrize("public", SMALL_ORDER_KEYS, ids=lambda k: k.hex()[:8])
def test_a_small_order_public_key_is_refused_and_verifies_nothing(public: bytes) -> None:
    for key in (public, public[:31] + bytes([public[31] | 0x80])):  # either sign of x
        assert not ed25519_public_ok(key)
        forged = bytes([1]) + bytes(63)  # R = neutral, S = 0: verifies under the neutral key
        assert not ed25519_verify(key, b"any coupon at all", forged)


def test_real_public_keys_pass_the_small_order_check() -> None:
    for _ in range(20):
        private = ed25519_new_private()
        public = ed25519_public_of(private)
        assert ed25519_public_ok(public)
        assert ed25519_verify(public, b"m", ed25519_sign(private, b"m"))
