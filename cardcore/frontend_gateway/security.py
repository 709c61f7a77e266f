"""The POS gateway's cryptography: keys at rest, terminal keys, MACs and PIN blocks (pure).

Data in, data out: no I/O, no asyncio, no logging. Error messages name the field and its
length, never a key, a PIN or a PIN block. Every failure raises `SecurityError`; a PIN block
that deciphers but is not a valid format raises its subclass `PinBlockError` (ISO response 99).

Key hierarchy
-------------
- The KEK (32 bytes, given by the operator) protects keys at rest: `seal` is AES-256-GCM with
  a random 12-byte nonce in front and a context as associated data (`b"tmk:" + terminal id`),
  so a sealed key opens only under its own context and cannot be moved to another terminal.
  `derive_key` takes further 32-byte keys from the KEK with HKDF-SHA256 (info = purpose), for
  example the key of the card-number lookup.
- Each terminal has a master key (TMK, 16 bytes, injected). At sign-on the gateway issues a
  PIN key (PIK) and a MAC key (MAK), each wrapped under the TMK and followed by its 4-byte
  check value: `wrapped_pik + kcv(pik) + wrapped_mak + kcv(mak)`.

Two modes (`KeyMode`), chosen per terminal
------------------------------------------
=============  ================================  ====================================
               `KeyMode.TDES` (legacy)           `KeyMode.AES` (default)
=============  ================================  ====================================
keys           double-length 3DES (K1K2)         AES-128
wrap           3DES-ECB under the TMK (16 B)     RFC 3394 AES key wrap (24 B)
check value    E(key, 8 zero bytes)[:4]          AES-CMAC(key, 16 zero bytes)[:4]
MAC (8 B)      ISO 9797-1 alg. 3 (X9.19 retail)  AES-CMAC truncated to 8 bytes
PIN block      ISO 9564-1 format 0 (8 B)         ISO 9564-1 format 4 (16 B)
=============  ================================  ====================================

A double-length key K1K2 is expanded to K1K2K1 before it reaches `TripleDES` (the library
deprecates 16-byte keys); single DES is 3DES with K1K1K1. The AES check value follows the
ANSI X9.24-1:2017 style of a CMAC over a zero block instead of an encrypted zero block.

The retail MAC zero-pads the data to a multiple of 8 bytes (ISO 9797-1 padding method 1; empty
data is one zero block), runs single-DES CBC under K1 over every block, then deciphers the last
block under K2 and enciphers it under K1. Zero padding cannot tell trailing zero bytes apart,
so the MAC'd data must carry its own length (ISO 8583 messages do).

PIN blocks (ISO 9564-1)
-----------------------
- Format 0: clear block = PIN field `0 N P..P F..F` XOR PAN field `0000` + the 12 rightmost
  PAN digits excluding the check digit (left-padded with zeros), enciphered with 3DES-ECB.
- Format 4: PIN field `4 N P..P A..A` (16 nibbles) + 8 random bytes; PAN field `M` (PAN length
  minus 12, or 0) + the PAN (left-padded with zeros to 12 digits) + zeros to 32 nibbles;
  block = AES(PIK, AES(PIK, PIN field) XOR PAN field). The random half makes two blocks of the
  same PIN differ.

`translate_pin_block` reads the terminal's block and re-enciphers the PIN as a format 4 block
under the host zone's PIN key (ZPK), so the clear PIN never leaves this module on that path.
"""

from __future__ import annotations

import enum
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

try:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - cryptography < 43 keeps it in the old place
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

from cardcore import vault

__all__ = [
    "KeyMode",
    "PinBlockError",
    "SecurityError",
    "WorkingKeys",
    "check_value",
    "derive_key",
    "issue_working_keys",
    "mac",
    "new_key",
    "pin_block_0",
    "pin_block_4",
    "read_pin_block_0",
    "read_pin_block_4",
    "read_working_keys",
    "read_zone_pin_block",
    "seal",
    "translate_pin_block",
    "unseal",
    "unwrap_working_key",
    "verify_mac",
    "wrap_working_key",
    "zone_pin_key",
    "zone_pin_reader",
]

KEK_BYTES = 32  # AES-256 key encryption key for keys at rest
KEY_BYTES = 16  # TMK, PIK, MAK, ZPK: double-length 3DES or AES-128
DERIVED_KEY_BYTES = 32
NONCE_BYTES = 12  # AES-GCM nonce in front of a sealed blob
GCM_TAG_BYTES = 16
KCV_BYTES = 4
MAC_BYTES = 8
DES_BLOCK_BYTES = 8
AES_BLOCK_BYTES = 16
PIN_DIGITS_MIN = 4
PIN_DIGITS_MAX = 12
PAN_DIGITS_MIN = 1
PAN_DIGITS_MAX = 19
_PIN_FIELD_NIBBLES = 16  # control + length + PIN + fill, in both formats
_PAN_DIGITS_BOUND = 12  # the PAN length both formats are built around
_FORMAT_4_RANDOM_BYTES = 8
_NEW_KEY_ATTEMPTS_MAX = 8  # K1 == K2 has probability 2**-56 per draw


class KeyMode(enum.StrEnum):
    """How a terminal's keys, MACs and PIN blocks work."""

    TDES = "3des"  # legacy: double-length 3DES, ISO 9797-1 alg. 3 MAC, PIN block format 0
    AES = "aes"  # default: AES-128, AES-CMAC, PIN block format 4


WRAPPED_KEY_BYTES = {KeyMode.TDES: 16, KeyMode.AES: 24}  # a working key under the TMK


class SecurityError(Exception):
    """A key, MAC or PIN block operation failed (bad length, tampering, wrong check value)."""


class PinBlockError(SecurityError):
    """A PIN block deciphered but is not a valid block of its format (ISO response 99)."""


@dataclass(frozen=True)
class WorkingKeys:
    """A terminal's clear working keys; `repr` never shows them. MACs under the MAK go
    through `tag` and `verify`: for AES the CMAC state after the key schedule is made once
    per session and copied for each message (1.4 us instead of 6 us a MAC here)."""

    pik: bytes = field(repr=False)
    mak: bytes = field(repr=False)
    # Made on first use; not to be pickled or deep-copied (cryptography's CMAC state).
    _cmac_base: cmac.CMAC | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _require_len(self.pik, KEY_BYTES, "PIK")
        _require_len(self.mak, KEY_BYTES, "MAK")

    def tag(self, mode: KeyMode, data: bytes) -> bytes:
        """`mac(mode, self.mak, data)`."""
        if mode is KeyMode.TDES:
            return _retail_mac(self.mak, data)
        base = self._cmac_base
        if base is None:
            base = cmac.CMAC(_aes(self.mak))
            object.__setattr__(self, "_cmac_base", base)
        one = base.copy()
        one.update(data)
        return one.finalize()[:MAC_BYTES]

    def verify(self, mode: KeyMode, data: bytes, tag: bytes) -> bool:
        """`verify_mac(mode, self.mak, data, tag)`: compared in constant time."""
        return hmac.compare_digest(self.tag(mode, data), tag)


# --- small helpers -------------------------------------------------------------------------


def _require_len(value: bytes, size: int, what: str) -> None:
    if len(value) != size:
        raise SecurityError(f"{what} must be {size} bytes, got {len(value)}")


def _xor(left: bytes, right: bytes) -> bytes:
    assert len(left) == len(right)
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


def _odd_parity(key: bytes) -> bytes:
    """Set the low bit of every byte so that each byte has an odd number of 1 bits (DES)."""
    return bytes(b & 0xFE | (~(b & 0xFE).bit_count() & 1) for b in key)


def _tdes(key: bytes) -> TripleDES:
    """3DES from a double-length key K1K2, expanded to K1K2K1."""
    _require_len(key, KEY_BYTES, "3DES key")
    return TripleDES(key + key[:DES_BLOCK_BYTES])


def _des(key: bytes) -> TripleDES:
    """Single DES from an 8-byte key, as 3DES with K K K."""
    assert len(key) == DES_BLOCK_BYTES
    return TripleDES(key * 3)


def _aes(key: bytes) -> algorithms.AES:
    _require_len(key, KEY_BYTES, "AES key")
    return algorithms.AES(key)


def _ecb_encrypt(algorithm: TripleDES | algorithms.AES, data: bytes) -> bytes:
    # ECB on whole blocks is what ISO 9564 PIN blocks, check values and key wrap use.
    encryptor = Cipher(algorithm, modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update(data) + encryptor.finalize()


def _ecb_decrypt(algorithm: TripleDES | algorithms.AES, data: bytes) -> bytes:
    decryptor = Cipher(algorithm, modes.ECB()).decryptor()  # noqa: S305 - see _ecb_encrypt
    return decryptor.update(data) + decryptor.finalize()


def _cmac(key: bytes, data: bytes) -> bytes:
    tag = cmac.CMAC(_aes(key))
    tag.update(data)
    return tag.finalize()


# --- keys at rest --------------------------------------------------------------------------


def seal(kek: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt a key for storage (`cardcore.vault.seal`: AES-256-GCM, context as AAD)."""
    try:
        return vault.seal(kek, plaintext, context)
    except vault.VaultError as exc:
        raise SecurityError(str(exc)) from None


def unseal(kek: bytes, sealed: bytes, context: bytes) -> bytes:
    """Open what `seal` returned; SecurityError if it was altered or the context differs."""
    try:
        return vault.unseal(kek, sealed, context)
    except vault.VaultError as exc:
        raise SecurityError(str(exc)) from None


def derive_key(kek: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, from the KEK with HKDF-SHA256 (info = purpose)."""
    try:
        return vault.derive_key(kek, purpose)
    except vault.VaultError as exc:
        raise SecurityError(str(exc)) from None


# --- terminal keys -------------------------------------------------------------------------


def new_key(mode: KeyMode) -> bytes:
    """16 random bytes; for 3DES with odd parity on every byte and K1 != K2."""
    if mode is KeyMode.TDES:
        return _new_tdes_key(os.urandom)
    return os.urandom(KEY_BYTES)


def _new_tdes_key(draw: Callable[[int], bytes]) -> bytes:
    for _ in range(_NEW_KEY_ATTEMPTS_MAX):
        key = _odd_parity(draw(KEY_BYTES))
        if key[:DES_BLOCK_BYTES] != key[DES_BLOCK_BYTES:]:
            return key
    raise SecurityError("the random source keeps returning K1 == K2")


def check_value(mode: KeyMode, key: bytes) -> bytes:
    """The 4-byte key check value.

    3DES: the first 4 bytes of 3DES-ECB(key, 8 zero bytes). AES: the first 4 bytes of
    AES-CMAC(key, 16 zero bytes), the ANSI X9.24-1:2017 style AES KCV.
    """
    if mode is KeyMode.TDES:
        return _ecb_encrypt(_tdes(key), bytes(DES_BLOCK_BYTES))[:KCV_BYTES]
    return _cmac(key, bytes(AES_BLOCK_BYTES))[:KCV_BYTES]


def wrap_working_key(mode: KeyMode, tmk: bytes, key: bytes) -> bytes:
    """A working key under the TMK: 3DES-ECB (16 bytes) or RFC 3394 AES key wrap (24 bytes)."""
    _require_len(key, KEY_BYTES, "working key")
    if mode is KeyMode.TDES:
        return _ecb_encrypt(_tdes(tmk), key)
    _require_len(tmk, KEY_BYTES, "TMK")
    return aes_key_wrap(tmk, key)


def unwrap_working_key(mode: KeyMode, tmk: bytes, wrapped: bytes) -> bytes:
    """The reverse of `wrap_working_key`. 3DES has no integrity: check the KCV after it."""
    _require_len(wrapped, WRAPPED_KEY_BYTES[mode], "wrapped working key")
    if mode is KeyMode.TDES:
        return _ecb_decrypt(_tdes(tmk), wrapped)
    _require_len(tmk, KEY_BYTES, "TMK")
    try:
        return aes_key_unwrap(tmk, wrapped)
    except InvalidUnwrap:
        raise SecurityError("wrapped working key does not unwrap under this TMK") from None


def issue_working_keys(mode: KeyMode, tmk: bytes) -> tuple[WorkingKeys, bytes]:
    """New PIK and MAK, and the sign-on payload `wrapped_pik kcv wrapped_mak kcv`."""
    keys = WorkingKeys(pik=new_key(mode), mak=new_key(mode))
    payload = b"".join(
        (
            wrap_working_key(mode, tmk, keys.pik),
            check_value(mode, keys.pik),
            wrap_working_key(mode, tmk, keys.mak),
            check_value(mode, keys.mak),
        )
    )
    return keys, payload


def read_working_keys(mode: KeyMode, tmk: bytes, payload: bytes) -> WorkingKeys:
    """What a terminal does with the sign-on payload: unwrap both keys, verify both KCVs."""
    part = WRAPPED_KEY_BYTES[mode] + KCV_BYTES
    _require_len(payload, 2 * part, "working key payload")
    pik = _read_one_key(mode, tmk, payload[:part], "PIK")
    mak = _read_one_key(mode, tmk, payload[part:], "MAK")
    return WorkingKeys(pik=pik, mak=mak)


def _read_one_key(mode: KeyMode, tmk: bytes, part: bytes, what: str) -> bytes:
    wrapped, kcv = part[:-KCV_BYTES], part[-KCV_BYTES:]
    key = unwrap_working_key(mode, tmk, wrapped)
    if not hmac.compare_digest(check_value(mode, key), kcv):
        raise SecurityError(f"{what} check value does not match")
    return key


# --- MAC -----------------------------------------------------------------------------------


def mac(mode: KeyMode, mak: bytes, data: bytes) -> bytes:
    """The 8-byte MAC: ISO 9797-1 algorithm 3 (3DES) or AES-CMAC truncated (AES)."""
    if mode is KeyMode.TDES:
        return _retail_mac(mak, data)
    return _cmac(mak, data)[:MAC_BYTES]


def verify_mac(mode: KeyMode, mak: bytes, data: bytes, tag: bytes) -> bool:
    """Whether `tag` is the MAC of `data`, compared in constant time."""
    return hmac.compare_digest(mac(mode, mak, data), tag)


def _zero_pad(data: bytes) -> bytes:
    """ISO 9797-1 padding method 1; empty data becomes one zero block."""
    remainder = len(data) % DES_BLOCK_BYTES
    if data and not remainder:
        return data
    return data + bytes(DES_BLOCK_BYTES - remainder)


def _retail_mac(mak: bytes, data: bytes) -> bytes:
    _require_len(mak, KEY_BYTES, "MAK")
    k1, k2 = mak[:DES_BLOCK_BYTES], mak[DES_BLOCK_BYTES:]
    encryptor = Cipher(_des(k1), modes.CBC(bytes(DES_BLOCK_BYTES))).encryptor()
    chained = (encryptor.update(_zero_pad(data)) + encryptor.finalize())[-DES_BLOCK_BYTES:]
    return _ecb_encrypt(_des(k1), _ecb_decrypt(_des(k2), chained))


# --- PIN blocks ----------------------------------------------------------------------------


def _check_pin(pin: str) -> None:
    if not (pin.isascii() and pin.isdigit()):
        raise SecurityError("PIN must be decimal digits")
    if not PIN_DIGITS_MIN <= len(pin) <= PIN_DIGITS_MAX:
        raise SecurityError(f"PIN must be {PIN_DIGITS_MIN} to {PIN_DIGITS_MAX} digits")


def _check_pan(pan: str) -> None:
    if not (pan.isascii() and pan.isdigit()):
        raise SecurityError("PAN must be decimal digits")
    if not PAN_DIGITS_MIN <= len(pan) <= PAN_DIGITS_MAX:
        raise SecurityError(f"PAN must be {PAN_DIGITS_MIN} to {PAN_DIGITS_MAX} digits")


def _pin_field(control: str, pin: str, fill: str) -> bytes:
    """`control`, PIN length, PIN digits, `fill` nibbles: 16 nibbles."""
    return bytes.fromhex(f"{control}{len(pin):X}{pin}".ljust(_PIN_FIELD_NIBBLES, fill))


def _read_pin_field(field8: bytes, control: str, fill: str) -> str:
    """The PIN from the first 8 bytes of a clear PIN field; PinBlockError if malformed."""
    nibbles = field8.hex().upper()
    if nibbles[0] != control:
        raise PinBlockError(f"PIN block control field is not {control}")
    length = int(nibbles[1], 16)
    if not PIN_DIGITS_MIN <= length <= PIN_DIGITS_MAX:
        raise PinBlockError(f"PIN block length {length} is outside 4..12")
    pin = nibbles[2 : 2 + length]
    if not pin.isdigit():
        raise PinBlockError("PIN block has a non-digit PIN nibble")
    if nibbles[2 + length :] != fill * (_PIN_FIELD_NIBBLES - 2 - length):
        raise PinBlockError(f"PIN block fill is not all {fill}")
    return pin


def _pan_field_0(pan: str) -> bytes:
    """0000 + the 12 rightmost PAN digits excluding the check digit, left-padded with 0."""
    return bytes.fromhex("0000" + pan[:-1][-_PAN_DIGITS_BOUND:].rjust(_PAN_DIGITS_BOUND, "0"))


def _clear_block_0(pin: str, pan: str) -> bytes:
    _check_pin(pin)
    _check_pan(pan)
    return _xor(_pin_field("0", pin, "F"), _pan_field_0(pan))


def pin_block_0(pin: str, pan: str, pik: bytes) -> bytes:
    """ISO 9564-1 format 0 PIN block (8 bytes), 3DES-ECB under the double-length PIK."""
    return _ecb_encrypt(_tdes(pik), _clear_block_0(pin, pan))


def read_pin_block_0(block: bytes, pan: str, pik: bytes) -> str:
    """The PIN in a format 0 block; PinBlockError if the deciphered block is malformed."""
    _require_len(block, DES_BLOCK_BYTES, "format 0 PIN block")
    _check_pan(pan)
    clear = _xor(_ecb_decrypt(_tdes(pik), block), _pan_field_0(pan))
    return _read_pin_field(clear, "0", "F")


def _pan_field_4(pan: str) -> bytes:
    """M (PAN length - 12, or 0), the PAN left-padded to 12 digits, zeros to 32 nibbles."""
    m = max(len(pan) - _PAN_DIGITS_BOUND, 0)
    digits = pan.rjust(_PAN_DIGITS_BOUND, "0")
    return bytes.fromhex(f"{m}{digits}".ljust(2 * AES_BLOCK_BYTES, "0"))


def _pin_block_4(pin: str, pan: str, pik: bytes, random_fill: bytes) -> bytes:
    _check_pin(pin)
    _check_pan(pan)
    assert len(random_fill) == _FORMAT_4_RANDOM_BYTES
    aes = _aes(pik)
    pin_field = _pin_field("4", pin, "A") + random_fill
    return _ecb_encrypt(aes, _xor(_ecb_encrypt(aes, pin_field), _pan_field_4(pan)))


def pin_block_4(pin: str, pan: str, pik: bytes) -> bytes:
    """ISO 9564-1:2017 format 4 PIN block (16 bytes) under the AES-128 PIK; random fill."""
    return _pin_block_4(pin, pan, pik, os.urandom(_FORMAT_4_RANDOM_BYTES))


def read_pin_block_4(block: bytes, pan: str, pik: bytes) -> str:
    """The PIN in a format 4 block; PinBlockError if the deciphered block is malformed."""
    _require_len(block, AES_BLOCK_BYTES, "format 4 PIN block")
    _check_pan(pan)
    aes = _aes(pik)
    pin_field = _ecb_decrypt(aes, _xor(_ecb_decrypt(aes, block), _pan_field_4(pan)))
    return _read_pin_field(pin_field[:DES_BLOCK_BYTES], "4", "A")


def translate_pin_block(mode: KeyMode, block: bytes, pan: str, pik: bytes, zpk: bytes) -> bytes:
    """The terminal's block (format 0 or 4 by mode) as a format 4 block under the zone key."""
    _require_len(zpk, KEY_BYTES, "ZPK")
    if mode is KeyMode.TDES:
        pin = read_pin_block_0(block, pan, pik)
    else:
        pin = read_pin_block_4(block, pan, pik)
    return pin_block_4(pin, pan, zpk)


def read_zone_pin_block(block: bytes, pan: str, zpk: bytes) -> str:
    """The PIN in a format 4 block under the zone PIN key."""
    return read_pin_block_4(block, pan, zpk)


ZONE_PIN_KEY_PURPOSE = b"cardcore/zone-pin-key/v1"


def zone_pin_key(kek: bytes) -> bytes:
    """The zone PIN key (ZPK) the gateway and the host share, derived from the KEK."""
    return derive_key(kek, ZONE_PIN_KEY_PURPOSE)[:KEY_BYTES]


def zone_pin_reader(kek: bytes) -> Callable[[str, str], str]:
    """The host's `pin_of(pan, zone block hex) -> PIN`: reads what `translate_pin_block`
    made; ValueError (never the block or the PIN in its message) when it does not read."""
    zpk = zone_pin_key(kek)

    def pin_of(pan: str, block_hex: str) -> str:
        try:
            return read_zone_pin_block(bytes.fromhex(block_hex), pan, zpk)
        except (SecurityError, ValueError):
            raise ValueError("the PIN block does not read under the zone PIN key") from None

    return pin_of
