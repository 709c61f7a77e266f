"""Secrets at rest on the host: sealing with AES-256-GCM, keyed lookup hashes, card tokens and
PIN verification values, all from the one key-encrypting key (KEK).

Support: used by the host's services (members, cards) and by the gateway's key handling
(`cardcore.frontend_gateway.security` seals terminal master keys with `seal`). Error messages
never carry a key, a PIN, a card number or an ID number.

Ed25519 (`ed25519_new_private`, `ed25519_public_of`, `ed25519_sign`, `ed25519_verify`) signs
the e-coupon QR payloads a POS may check offline (`cardcore.coupons.model.qr_payload`); verify
answers False on any bad input and never raises, and refuses small-order and non-canonical
public keys (`ed25519_public_ok`), which OpenSSL would accept.

Keys
----
- `seal(kek, plaintext, context)`: a random 12-byte nonce in front of AES-256-GCM with the
  context as associated data, so a sealed value opens only under its own context (a sealed
  ID number cannot be moved to another member, a master key to another terminal).
- `derive_key(kek, purpose)`: HKDF-SHA256, one 32-byte key per purpose.
- Card tokens: HMAC-SHA256 of the card number under HMAC(KEK, "cardcore/card-token/v1"): the
  key the host finds a card by; the number itself is only stored sealed.
- Lookup hashes (ID documents): HMAC-SHA256 under a derived key, per purpose.
- PIN verification values: HMAC-SHA256 under a derived PIN verification key over the card
  token and the PIN. A PIN is never stored; without the KEK the value cannot be searched.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEK_BYTES = 32
NONCE_BYTES = 12
GCM_TAG_BYTES = 16
DERIVED_KEY_BYTES = 32


class VaultError(Exception):
    """A sealed value that does not open, or a key of the wrong size."""


def _require_kek(kek: bytes) -> None:
    if len(kek) != KEK_BYTES:
        raise VaultError(f"KEK must be {KEK_BYTES} bytes, got {len(kek)}")


def seal(kek: bytes, plaintext: bytes, context: bytes) -> bytes:
    """nonce (12 bytes) + AES-256-GCM(plaintext, aad=context)."""
    _require_kek(kek)
    if not context:
        raise VaultError("context must not be empty: it binds the sealed value to its owner")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, plaintext, context)


def unseal(kek: bytes, sealed: bytes, context: bytes) -> bytes:
    """Open what `seal` returned; VaultError if it was altered or the context differs."""
    _require_kek(kek)
    if len(sealed) < NONCE_BYTES + GCM_TAG_BYTES:
        raise VaultError(f"sealed blob is too short: {len(sealed)} bytes")
    nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        return AESGCM(kek).decrypt(nonce, body, context)
    except InvalidTag:
        raise VaultError("sealed blob does not open: altered, wrong KEK or context") from None


def derive_key(kek: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, from the KEK with HKDF-SHA256 (info = purpose)."""
    _require_kek(kek)
    if not purpose:
        raise VaultError("purpose must not be empty")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=DERIVED_KEY_BYTES, salt=None, info=purpose)
    return hkdf.derive(kek)


def kek_check_value(kek: bytes) -> str:
    """A KEK's check value (16 hex digits of an HKDF derivation: tells two keys apart and
    says nothing of either), kept in the database it seals for (`migrate.check_kek`)."""
    return derive_key(kek, b"cardcore/kek-check/v1")[:8].hex()


def token_key_of(kek: bytes) -> bytes:
    return hmac.new(kek, b"cardcore/card-token/v1", hashlib.sha256).digest()


def card_token(token_key: bytes, pan: str) -> str:
    """The keyed hash a card is found by: the PAN itself is never stored in clear or logged."""
    return hmac.new(token_key, pan.encode("ascii"), hashlib.sha256).hexdigest()


class Vault:
    """The host's secrets, derived once from the KEK."""

    def __init__(self, kek: bytes) -> None:
        _require_kek(kek)
        self._kek = kek
        self.token_key = token_key_of(kek)
        self._lookup_key = derive_key(kek, b"cardcore/lookup/v1")
        self._pin_key = derive_key(kek, b"cardcore/pin-verification/v1")
        self._data_key = derive_key(kek, b"cardcore/data-at-rest/v1")

    def card_token(self, pan: str) -> str:
        return card_token(self.token_key, pan)

    def lookup(self, purpose: str, value: str) -> str:
        """A keyed hash to find a record by a secret value (an ID number) without storing it."""
        message = purpose.encode() + b"\x00" + value.encode("utf-8")
        return hmac.new(self._lookup_key, message, hashlib.sha256).hexdigest()

    def seal_text(self, context: str, text: str) -> str:
        return seal(self._data_key, text.encode("utf-8"), context.encode()).hex()

    def open_text(self, context: str, sealed_hex: str) -> str:
        try:
            sealed = bytes.fromhex(sealed_hex)
        except ValueError:
            raise VaultError("sealed value is not hex") from None
        return unseal(self._data_key, sealed, context.encode()).decode("utf-8")

    def pvv(self, token: str, pin: str) -> str:
        """The PIN verification value of `pin` on the card with `token`."""
        message = token.encode() + b"\x00" + pin.encode("ascii")
        return hmac.new(self._pin_key, message, hashlib.sha256).hexdigest()

    def pin_matches(self, token: str, pin: str, pvv: str) -> bool:
        return bool(pvv) and hmac.compare_digest(self.pvv(token, pin), pvv)


# --- Ed25519: signed coupon QR codes -----------------------------------------------------------
# An issuing legal entity signs its coupons' QR payloads (`cardcore.coupons.model.qr_payload`)
# with its private key; anyone holding the public key verifies them offline. Raw encodings:
# 32-byte keys, 64-byte signatures. The private key is stored sealed (`seal`), never in clear.

ED25519_PRIVATE_BYTES = 32
ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64


def _ed25519_private(private: bytes) -> ed25519.Ed25519PrivateKey:
    if len(private) != ED25519_PRIVATE_BYTES:
        raise VaultError(f"Ed25519 private key must be {ED25519_PRIVATE_BYTES} bytes")
    return ed25519.Ed25519PrivateKey.from_private_bytes(private)


def ed25519_new_private() -> bytes:
    """A fresh Ed25519 private key: its 32 raw bytes, from the operating system's CSPRNG."""
    return ed25519.Ed25519PrivateKey.generate().private_bytes_raw()


def ed25519_public_of(private: bytes) -> bytes:
    """The 32 raw bytes of the public key of `private`; VaultError if it is not 32 bytes."""
    return _ed25519_private(private).public_key().public_bytes_raw()


def ed25519_sign(private: bytes, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of `message`; VaultError for a key of the wrong size."""
    return _ed25519_private(private).sign(message)


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `public`'s signature of `message`. False, never an exception, for
    any bad signature or key (wrong size, not a key, not bytes)."""
    try:
        if len(public) != ED25519_PUBLIC_BYTES or len(signature) != ED25519_SIGNATURE_BYTES:
            return False
        if not ed25519_public_ok(public):
            return False
        key = ed25519.Ed25519PublicKey.from_public_bytes(public)
        key.verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):  # TypeError: not bytes at all
        return False
    return True


# Edwards25519 (RFC 8032 5.1): -x^2 + y^2 = 1 + d x^2 y^2 over GF(2^255 - 19).
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_TORSION = 8  # the curve's cofactor: a point P with 8P = O has small order


def ed25519_public_ok(public: bytes) -> bool:
    """Whether `public` encodes a curve point canonically (y < p, RFC 8032 5.1.3) that does not
    have small order. OpenSSL accepts the eight small-order points (and non-canonical forms of
    some), under which a fixed signature verifies for messages nobody signed; a key from a
    partner or a configuration must pass this before it is trusted."""
    if len(public) != ED25519_PUBLIC_BYTES:
        return False
    y = int.from_bytes(public, "little") & ((1 << 255) - 1)
    if y >= _P:
        return False
    x = _recover_x(y, public[31] >> 7)
    if x is None:
        return False
    point = (x, y)
    for _ in range(3):  # 8P
        point = _edwards_add(point, point)
    return point != (0, 1)


def _recover_x(y: int, sign: int) -> int | None:
    """x of the point with `y` and x's low bit `sign`, or None when there is none."""
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if (v * x * x - u) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (v * x * x - u) % _P != 0:
        return None
    if x == 0 and sign:
        return None
    return _P - x if x & 1 != sign else x


def _edwards_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The complete twisted Edwards addition law (a = -1)."""
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, _P - 2, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P
    return x3, y3
