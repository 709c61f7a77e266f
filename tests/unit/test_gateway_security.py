"""The gateway's cryptography: published vectors first, then round trips and refusals.

Expected values come from published vectors (RFC 4493, RFC 3394, ISO 9564 examples, the ep2
format 4 vector) or are recomputed here step by step with raw `cryptography` primitives, never
by calling the function under test.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import warnings
from collections.abc import Callable

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from cardcore.frontend_gateway import security
from cardcore.frontend_gateway.security import (
    KeyMode,
    PinBlockError,
    SecurityError,
    WorkingKeys,
    check_value,
    derive_key,
    issue_working_keys,
    mac,
    new_key,
    pin_block_0,
    pin_block_4,
    read_pin_block_0,
    read_pin_block_4,
    read_working_keys,
    read_zone_pin_block,
    seal,
    translate_pin_block,
    unseal,
    unwrap_working_key,
    verify_mac,
    wrap_working_key,
)

KEK = bytes(range(32))
TDES_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
AES_KEY = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")  # RFC 4493
KEY_OF = {KeyMode.TDES: TDES_KEY, KeyMode.AES: AES_KEY}
OTHER_KEY_OF = {
    KeyMode.TDES: bytes.fromhex("89ABCDEF01234567FEDCBA9876543210"),
    KeyMode.AES: bytes.fromhex("000102030405060708090A0B0C0D0E0F"),
}
ZPK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
PAN = "4111111111111111"
MODES = list(KeyMode)

_digits = "0123456789"
pins = st.text(alphabet=_digits, min_size=4, max_size=12)
pans = st.text(alphabet=_digits, min_size=12, max_size=19)
keys16 = st.binary(min_size=16, max_size=16)
fast = settings(max_examples=60, deadline=None)


def _flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- raw primitives, written out for independent expected values ---------------------------


def _ecb(algorithm: TripleDES | algorithms.AES, data: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(algorithm, modes.ECB())  # noqa: S305 - single-block reference computations
    context = cipher.decryptor() if decrypt else cipher.encryptor()
    return context.update(data) + context.finalize()


def _raw_des(key8: bytes) -> TripleDES:
    return TripleDES(key8 * 3)


def _raw_tdes(key16: bytes) -> TripleDES:
    return TripleDES(key16 + key16[:8])


def _reference_retail_mac(mak: bytes, padded: bytes) -> bytes:
    """ISO 9797-1 MAC algorithm 3, block by block with single-DES ECB."""
    k1, k2 = mak[:8], mak[8:]
    chained = bytes(8)
    for start in range(0, len(padded), 8):
        block = padded[start : start + 8]
        chained = _ecb(_raw_des(k1), bytes(a ^ b for a, b in zip(chained, block, strict=True)))
    return _ecb(_raw_des(k1), _ecb(_raw_des(k2), chained, decrypt=True))


def _raw_cmac(key: bytes, data: bytes) -> bytes:
    tag = cmac.CMAC(algorithms.AES(key))
    tag.update(data)
    return tag.finalize()


def _raw_format_4_block(pin_field: bytes, pan_field: bytes, key: bytes) -> bytes:
    aes = algorithms.AES(key)
    intermediate = _ecb(aes, pin_field)
    return _ecb(aes, bytes(a ^ b for a, b in zip(intermediate, pan_field, strict=True)))


# --- known answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "full_tag"),
    [
        ("", "bb1d6929e95937287fa37d129b756746"),
        ("6bc1bee22e409f96e93d7e117393172a", "070a16b46b4d4144f79bdd9dd04a287c"),
    ],
)
def test_aes_mac_is_the_rfc_4493_cmac_truncated_to_8_bytes(message: str, full_tag: str) -> None:
    tag = mac(KeyMode.AES, AES_KEY, bytes.fromhex(message))

    assert tag == bytes.fromhex(full_tag)[:8]


def test_tdes_check_value_matches_the_published_08d7b4() -> None:
    kcv = check_value(KeyMode.TDES, TDES_KEY)

    assert len(kcv) == 4
    assert kcv[:3] == bytes.fromhex("08D7B4")


def test_aes_check_value_is_the_cmac_of_a_zero_block() -> None:
    kcv = check_value(KeyMode.AES, AES_KEY)

    assert kcv == _raw_cmac(AES_KEY, bytes(16))[:4]
    assert kcv != _ecb(algorithms.AES(AES_KEY), bytes(16))[:4]  # not the legacy method


def test_aes_working_key_wrap_matches_rfc_3394_section_4_1() -> None:
    kek = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
    key = bytes.fromhex("00112233445566778899AABBCCDDEEFF")

    wrapped = wrap_working_key(KeyMode.AES, kek, key)

    assert wrapped == bytes.fromhex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5")
    assert unwrap_working_key(KeyMode.AES, kek, wrapped) == key


def test_tdes_working_key_wrap_is_3des_ecb_under_k1k2k1() -> None:
    wrapped = wrap_working_key(KeyMode.TDES, TDES_KEY, OTHER_KEY_OF[KeyMode.TDES])

    assert wrapped == _ecb(_raw_tdes(TDES_KEY), OTHER_KEY_OF[KeyMode.TDES])


@pytest.mark.parametrize(
    ("pin", "pan", "clear_block"),
    [
        # 041234FFFFFFFFFF XOR 0000111111111111 (0x34 ^ 0x11 = 0x25)
        ("1234", "4111111111111111", "041225EEEEEEEEEE"),
        # the common textbook example (PAN field 0000987654321098)
        ("1234", "43219876543210987", "0412AC89ABCDEF67"),
        # psec's vectors
        ("1234", "5555555551234567", "041261AAAAEDCBA9"),
        ("123456789012", "5555555551234567", "0C1261032D8226A9"),
        # a 12-digit PAN has 11 digits before its check digit: left-padded with one zero
        ("1234", "123456789012", "041235DCBA9876FE"),
    ],
)
def test_format_0_clear_block_matches_published_examples(
    pin: str, pan: str, clear_block: str
) -> None:
    assert security._clear_block_0(pin, pan) == bytes.fromhex(clear_block)


def test_format_0_block_is_the_clear_block_under_3des_ecb() -> None:
    block = pin_block_0("1234", PAN, TDES_KEY)

    assert len(block) == 8
    assert _ecb(_raw_tdes(TDES_KEY), block, decrypt=True) == bytes.fromhex("041225EEEEEEEEEE")


@pytest.mark.parametrize(
    ("key", "block", "pan", "pin"),
    [
        # ep2 eft/pos 2000 Security Specification 8.0.0, 8.4 PIN Encryption (via psec)
        (
            "C1D0F8FB4958670DBA40AB1F3752EF0D",
            "CC17F65586BFD0953010226C4FC5B3CA",
            "432198765432109870",
            "1234",
        ),
        # a PAN shorter than 12 digits (psec)
        ("00112233445566778899AABBCCDDEEFF", "39B69B1B91FE05D48F7EF0D68EB2CBD6", "1", "123456"),
    ],
)
def test_format_4_reads_published_blocks(key: str, block: str, pan: str, pin: str) -> None:
    assert read_pin_block_4(bytes.fromhex(block), pan, bytes.fromhex(key)) == pin


def test_format_4_enciphers_the_published_block_for_a_fixed_random_fill() -> None:
    block = security._pin_block_4("1234", "1234567890123456789", ZPK, b"\xff" * 8)

    assert block == bytes.fromhex("28B41FDDD29B743E93124BD8E32D921E")


@pytest.mark.parametrize(
    ("pan", "pan_field"),
    [
        ("4111111111111111", "44111111111111111000000000000000"),
        ("1234567890123456789", "71234567890123456789000000000000"),
        ("123456789012", "01234567890120000000000000000000"),
        ("1", "00000000000010000000000000000000"),
    ],
)
def test_format_4_pan_field_carries_m_and_the_padded_pan(pan: str, pan_field: str) -> None:
    assert security._pan_field_4(pan) == bytes.fromhex(pan_field)


@pytest.mark.parametrize(
    ("message_hex", "padded_hex"),
    [
        # three full blocks: no padding
        ("00112233445566778899AABBCCDDEEFF0123456789ABCDEF", None),
        # 13 bytes: zero-padded to 16
        ("48656C6C6F2C20776F726C6421", "48656C6C6F2C20776F726C6421000000"),
        # empty: one zero block
        ("", "0000000000000000"),
    ],
)
def test_tdes_mac_is_iso_9797_1_algorithm_3(message_hex: str, padded_hex: str | None) -> None:
    message = bytes.fromhex(message_hex)
    padded = bytes.fromhex(padded_hex) if padded_hex is not None else message

    tag = mac(KeyMode.TDES, TDES_KEY, message)

    assert len(padded) % 8 == 0
    assert tag == _reference_retail_mac(TDES_KEY, padded)
    if len(padded) > 8:  # on one block, algorithm 3 is exactly 3DES; on more it is not
        assert tag != _ecb(_raw_tdes(TDES_KEY), padded[-8:])
    else:
        assert tag == _ecb(_raw_tdes(TDES_KEY), padded)


def test_tdes_mac_cannot_tell_trailing_zero_bytes_apart() -> None:
    # A property of padding method 1: the MAC'd data must carry its own length (ISO 8583 does).
    data = b"0200 purchase 000000012345"

    assert mac(KeyMode.TDES, TDES_KEY, data) == mac(KeyMode.TDES, TDES_KEY, data + b"\x00")
    assert mac(KeyMode.AES, AES_KEY, data) != mac(KeyMode.AES, AES_KEY, data + b"\x00")


def test_tdes_operations_raise_no_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mac(KeyMode.TDES, TDES_KEY, b"message")
        read_pin_block_0(pin_block_0("1234", PAN, TDES_KEY), PAN, TDES_KEY)
        check_value(KeyMode.TDES, TDES_KEY)


# --- keys at rest --------------------------------------------------------------------------


@fast
@given(plaintext=st.binary(max_size=64), terminal=st.binary(min_size=1, max_size=16))
def test_sealed_key_opens_under_its_own_context(plaintext: bytes, terminal: bytes) -> None:
    context = b"tmk:" + terminal

    sealed = seal(KEK, plaintext, context)

    assert len(sealed) == 12 + len(plaintext) + 16
    assert unseal(KEK, sealed, context) == plaintext


def test_sealing_twice_uses_fresh_nonces() -> None:
    assert seal(KEK, TDES_KEY, b"tmk:T1") != seal(KEK, TDES_KEY, b"tmk:T1")


def test_sealed_key_does_not_open_for_another_terminal() -> None:
    sealed = seal(KEK, AES_KEY, b"tmk:T0000001")

    with pytest.raises(SecurityError, match="does not open"):
        unseal(KEK, sealed, b"tmk:T0000002")


def test_sealed_key_does_not_open_under_another_kek() -> None:
    sealed = seal(KEK, AES_KEY, b"tmk:T1")

    with pytest.raises(SecurityError, match="does not open"):
        unseal(bytes(32), sealed, b"tmk:T1")


@pytest.mark.parametrize("index", [0, 11, 12, 27, 43])  # nonce, ciphertext, tag
def test_sealed_blob_with_a_flipped_bit_is_refused(index: int) -> None:
    sealed = seal(KEK, AES_KEY, b"tmk:T1")
    assert len(sealed) == 44

    with pytest.raises(SecurityError):
        unseal(KEK, _flip_bit(sealed, index), b"tmk:T1")


def test_sealing_refuses_bad_inputs() -> None:
    with pytest.raises(SecurityError, match="KEK must be 32 bytes"):
        seal(bytes(16), AES_KEY, b"tmk:T1")
    with pytest.raises(SecurityError, match="context"):
        seal(KEK, AES_KEY, b"")
    with pytest.raises(SecurityError, match="too short"):
        unseal(KEK, bytes(27), b"tmk:T1")


def test_derived_key_is_hkdf_sha256_with_the_purpose_as_info() -> None:
    purpose = b"card-number-lookup"
    prk = hmac.new(bytes(32), KEK, hashlib.sha256).digest()  # RFC 5869 extract, no salt
    expected = hmac.new(prk, purpose + b"\x01", hashlib.sha256).digest()  # expand, one block

    assert derive_key(KEK, purpose) == expected
    assert derive_key(KEK, b"other purpose") != expected
    with pytest.raises(SecurityError):
        derive_key(KEK, b"")
    with pytest.raises(SecurityError):
        derive_key(bytes(31), purpose)


# --- terminal keys -------------------------------------------------------------------------


def _has_odd_parity(key: bytes) -> bool:
    return all(b.bit_count() % 2 == 1 for b in key)


def test_odd_parity_fixes_every_byte_value_by_its_low_bit_only() -> None:
    fixed = security._odd_parity(bytes(range(256)))

    assert _has_odd_parity(fixed)
    assert all(f & 0xFE == b & 0xFE for f, b in zip(fixed, range(256), strict=True))


def test_new_tdes_keys_have_odd_parity_and_distinct_halves() -> None:
    generated = [new_key(KeyMode.TDES) for _ in range(50)]

    assert all(len(key) == 16 and _has_odd_parity(key) for key in generated)
    assert all(key[:8] != key[8:] for key in generated)
    assert len(set(generated)) == 50


def test_new_tdes_key_draws_again_when_k1_equals_k2() -> None:
    draws = iter([bytes(8) * 2, bytes(range(16))])

    key = security._new_tdes_key(lambda n: next(draws))

    assert key == security._odd_parity(bytes(range(16)))


def test_new_tdes_key_gives_up_on_a_broken_random_source() -> None:
    with pytest.raises(SecurityError, match="K1 == K2"):
        security._new_tdes_key(bytes)  # all zeros: K1 == K2 every time


def test_new_aes_keys_are_16_random_bytes() -> None:
    generated = {new_key(KeyMode.AES) for _ in range(20)}

    assert len(generated) == 20
    assert all(len(key) == 16 for key in generated)


@pytest.mark.parametrize("mode", MODES)
def test_check_value_refuses_a_key_of_the_wrong_length(mode: KeyMode) -> None:
    with pytest.raises(SecurityError, match="must be 16 bytes"):
        check_value(mode, bytes(24))


@pytest.mark.parametrize("mode", MODES)
@fast
@given(tmk=keys16, key=keys16)
def test_working_key_unwraps_to_itself(mode: KeyMode, tmk: bytes, key: bytes) -> None:
    wrapped = wrap_working_key(mode, tmk, key)

    assert len(wrapped) == {KeyMode.TDES: 16, KeyMode.AES: 24}[mode]
    assert unwrap_working_key(mode, tmk, wrapped) == key


def test_aes_working_key_does_not_unwrap_under_another_tmk() -> None:
    wrapped = wrap_working_key(KeyMode.AES, AES_KEY, ZPK)

    with pytest.raises(SecurityError, match="does not unwrap"):
        unwrap_working_key(KeyMode.AES, OTHER_KEY_OF[KeyMode.AES], wrapped)


@pytest.mark.parametrize("mode", MODES)
def test_sign_on_payload_gives_the_terminal_the_issued_keys(mode: KeyMode) -> None:
    tmk = new_key(mode)

    keys, payload = issue_working_keys(mode, tmk)

    assert len(payload) == {KeyMode.TDES: 40, KeyMode.AES: 56}[mode]
    assert keys.pik != keys.mak
    assert read_working_keys(mode, tmk, payload) == keys
    part = len(payload) // 2
    assert payload[part - 4 : part] == check_value(mode, keys.pik)
    assert payload[-4:] == check_value(mode, keys.mak)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["pik_kcv", "mak_kcv", "pik_wrapped", "mak_wrapped"])
def test_sign_on_payload_with_a_flipped_bit_is_refused(mode: KeyMode, where: str) -> None:
    tmk = new_key(mode)
    _, payload = issue_working_keys(mode, tmk)
    part = len(payload) // 2
    index = {"pik_kcv": part - 1, "mak_kcv": 2 * part - 1, "pik_wrapped": 0, "mak_wrapped": part}

    with pytest.raises(SecurityError):
        read_working_keys(mode, tmk, _flip_bit(payload, index[where]))


@pytest.mark.parametrize("mode", MODES)
def test_sign_on_payload_under_another_tmk_is_refused(mode: KeyMode) -> None:
    _, payload = issue_working_keys(mode, KEY_OF[mode])

    with pytest.raises(SecurityError):
        read_working_keys(mode, OTHER_KEY_OF[mode], payload)


@pytest.mark.parametrize("mode", MODES)
def test_sign_on_payload_of_the_wrong_length_is_refused(mode: KeyMode) -> None:
    _, payload = issue_working_keys(mode, KEY_OF[mode])

    with pytest.raises(SecurityError, match="payload must be"):
        read_working_keys(mode, KEY_OF[mode], payload[:-1])


def test_working_keys_never_show_in_repr() -> None:
    keys = WorkingKeys(pik=TDES_KEY, mak=AES_KEY)

    assert TDES_KEY.hex() not in repr(keys).lower()
    assert "2b7e" not in repr(keys).lower()
    with pytest.raises(SecurityError):
        WorkingKeys(pik=bytes(8), mak=AES_KEY)


# --- MAC -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@fast
@given(data=st.binary(max_size=200))
def test_mac_verifies_its_own_data(mode: KeyMode, data: bytes) -> None:
    tag = mac(mode, KEY_OF[mode], data)

    assert len(tag) == 8
    assert verify_mac(mode, KEY_OF[mode], data, tag)


@pytest.mark.parametrize("mode", MODES)
@fast
@given(messages=st.lists(st.binary(max_size=200), min_size=1, max_size=5))
def test_a_sessions_keys_mac_each_message_as_mac_does(mode: KeyMode, messages: list[bytes]) -> None:
    """WorkingKeys.tag reuses one CMAC state per session: every message, in any order and
    however often, gets the tag `mac` gives it alone, and `verify` accepts only that."""
    key = KEY_OF[mode]
    keys = WorkingKeys(pik=key, mak=key)
    for data in [*messages, *reversed(messages)]:
        tag = keys.tag(mode, data)
        assert tag == mac(mode, key, data)
        assert keys.verify(mode, data, tag)
        assert not keys.verify(mode, data + b"\x01", tag)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bit", range(0, 64, 9))
def test_mac_with_one_bit_flipped_does_not_verify(mode: KeyMode, bit: int) -> None:
    data = b"0200 purchase 000000012345"
    tag = mac(mode, KEY_OF[mode], data)
    flipped = bytearray(tag)
    flipped[bit // 8] ^= 1 << (bit % 8)

    assert not verify_mac(mode, KEY_OF[mode], data, bytes(flipped))


@pytest.mark.parametrize("mode", MODES)
def test_mac_refuses_altered_data_short_tags_and_other_keys(mode: KeyMode) -> None:
    data = b"0200 purchase 000000012345"
    tag = mac(mode, KEY_OF[mode], data)

    assert not verify_mac(mode, KEY_OF[mode], data + b"\x01", tag)
    assert not verify_mac(mode, KEY_OF[mode], data, tag[:4])
    assert not verify_mac(mode, OTHER_KEY_OF[mode], data, tag)
    with pytest.raises(SecurityError):
        mac(mode, bytes(8), data)


# --- PIN blocks ----------------------------------------------------------------------------


@fast
@given(pin=pins, pan=pans, pik=keys16)
def test_format_0_block_reads_back_its_pin(pin: str, pan: str, pik: bytes) -> None:
    block = pin_block_0(pin, pan, pik)

    assert len(block) == 8
    assert read_pin_block_0(block, pan, pik) == pin


@fast
@given(pin=pins, pan=st.text(alphabet=_digits, min_size=1, max_size=19), pik=keys16)
def test_format_4_block_reads_back_its_pin(pin: str, pan: str, pik: bytes) -> None:
    block = pin_block_4(pin, pan, pik)

    assert len(block) == 16
    assert read_pin_block_4(block, pan, pik) == pin


@pytest.mark.parametrize(
    ("pin_digits", "pan_digits"), list(itertools.product(range(4, 13), range(12, 20)))
)
def test_every_pin_and_pan_length_round_trips_in_both_formats(
    pin_digits: int, pan_digits: int
) -> None:
    pin = "9876543210987"[:pin_digits]
    pan = "6212345678901234567"[:pan_digits]

    assert read_pin_block_0(pin_block_0(pin, pan, TDES_KEY), pan, TDES_KEY) == pin
    assert read_pin_block_4(pin_block_4(pin, pan, AES_KEY), pan, AES_KEY) == pin


def test_format_4_blocks_of_the_same_pin_differ() -> None:
    blocks = {pin_block_4("1234", PAN, AES_KEY) for _ in range(10)}

    assert len(blocks) == 10
    assert all(read_pin_block_4(block, PAN, AES_KEY) == "1234" for block in blocks)


def test_format_4_block_under_another_pik_is_refused() -> None:
    for _ in range(20):
        block = pin_block_4("1234", PAN, AES_KEY)
        with pytest.raises(PinBlockError):
            read_pin_block_4(block, PAN, OTHER_KEY_OF[KeyMode.AES])


def test_format_4_block_for_another_pan_is_refused() -> None:
    block = pin_block_4("1234", PAN, AES_KEY)

    with pytest.raises(PinBlockError):
        read_pin_block_4(block, "4111111111111112", AES_KEY)


@pytest.mark.parametrize(
    ("clear_block", "reason"),
    [
        # psec's malformed format 0 blocks, already XORed with the PAN field of 5555555551234567
        ("241261AAAAEDCBA9", "control field"),
        ("0F1261AAAAEDCBA9", "length 15"),
        ("021261AAAAEDCBA9", "length 2"),
        ("041261AAAAEDCBAA", "fill"),
        ("051261AAAAEDCBA9", "non-digit"),
    ],
)
def test_malformed_format_0_block_is_a_pin_block_error(clear_block: str, reason: str) -> None:
    block = _ecb(_raw_tdes(TDES_KEY), bytes.fromhex(clear_block))

    with pytest.raises(PinBlockError, match=reason):
        read_pin_block_0(block, "5555555551234567", TDES_KEY)


@pytest.mark.parametrize(
    ("pin_field", "reason"),
    [
        ("541234AAAAAAAAAA", "control field"),
        ("441234FFFFFFFFFF", "fill"),
        ("441234AAAAAAAAAB", "fill"),
        ("43123AAAAAAAAAAA", "length 3"),
        ("4D1234567890123A", "length 13"),
        ("4412D4AAAAAAAAAA", "non-digit"),
    ],
)
def test_malformed_format_4_block_is_a_pin_block_error(pin_field: str, reason: str) -> None:
    pan_field = bytes.fromhex("44111111111111111000000000000000")  # PAN 4111111111111111
    field = bytes.fromhex(pin_field) + bytes.fromhex("548ED7FD65495950")
    block = _raw_format_4_block(field, pan_field, AES_KEY)

    with pytest.raises(PinBlockError, match=reason):
        read_pin_block_4(block, PAN, AES_KEY)


@pytest.mark.parametrize(
    ("key", "block", "pan", "reason"),
    [  # psec's malformed format 4 blocks
        (
            "E60B15B90ABDF14CEE337C97440F0D6E",
            "7D5AF4C33667A2098626027FB7A9A1B7",
            "4266229809609384667",
            "control field",
        ),
        (
            "C7BBEBA16C5AD97D5866450718C03750",
            "2F9C910447F17293EC95DEDE1E3CA201",
            "8220499325458689523",
            "non-digit",
        ),
        (
            "820F6C7C12355BDFF1AB6CE12E8EED89",
            "CCF310A8300B46C925A86B1098089301",
            "939589847393485609",
            "fill",
        ),
    ],
)
def test_published_malformed_format_4_blocks_are_refused(
    key: str, block: str, pan: str, reason: str
) -> None:
    with pytest.raises(PinBlockError, match=reason):
        read_pin_block_4(bytes.fromhex(block), pan, bytes.fromhex(key))


WriteBlock = Callable[[str, str, bytes], bytes]


@pytest.mark.parametrize(
    ("write", "key"), [(pin_block_0, TDES_KEY), (pin_block_4, AES_KEY)], ids=["fmt0", "fmt4"]
)
@pytest.mark.parametrize(
    ("pin", "pan"),
    [
        ("123", PAN),
        ("1234567890123", PAN),
        ("12a4", PAN),
        ("١٢٣٤", PAN),  # Arabic-Indic digits are digits to str.isdigit, not to a PIN pad
        ("", PAN),
        ("1234", ""),
        ("1234", "41111111111111111111"),
        ("1234", "4111-1111-1111-1111"),
    ],
)
def test_pins_and_pans_must_be_digit_strings_of_allowed_length(
    write: WriteBlock, key: bytes, pin: str, pan: str
) -> None:
    with pytest.raises(SecurityError) as raised:
        write(pin, pan, key)

    assert type(raised.value) is SecurityError


def test_pin_blocks_of_the_wrong_length_or_key_are_security_errors() -> None:
    with pytest.raises(SecurityError, match="format 0 PIN block must be 8 bytes"):
        read_pin_block_0(bytes(16), PAN, TDES_KEY)
    with pytest.raises(SecurityError, match="format 4 PIN block must be 16 bytes"):
        read_pin_block_4(bytes(8), PAN, AES_KEY)
    with pytest.raises(SecurityError, match="must be 16 bytes"):
        pin_block_4("1234", PAN, bytes(32))
    with pytest.raises(SecurityError, match="must be 16 bytes"):
        pin_block_0("1234", PAN, bytes(24))


@pytest.mark.parametrize("mode", MODES)
@fast
@given(pin=pins, pan=pans)
def test_translated_block_carries_the_pin_under_the_zone_key(
    mode: KeyMode, pin: str, pan: str
) -> None:
    pik = KEY_OF[mode]
    block = pin_block_0(pin, pan, pik) if mode is KeyMode.TDES else pin_block_4(pin, pan, pik)

    zone_block = translate_pin_block(mode, block, pan, pik, ZPK)

    assert len(zone_block) == 16
    assert read_zone_pin_block(zone_block, pan, ZPK) == pin


def test_translated_block_does_not_read_under_the_terminal_key() -> None:
    block = pin_block_4("1234", PAN, AES_KEY)

    zone_block = translate_pin_block(KeyMode.AES, block, PAN, AES_KEY, ZPK)

    with pytest.raises(PinBlockError):
        read_pin_block_4(zone_block, PAN, AES_KEY)


def test_translation_refuses_a_malformed_terminal_block_and_a_bad_zone_key() -> None:
    malformed = _ecb(_raw_tdes(TDES_KEY), bytes.fromhex("241261AAAAEDCBA9"))
    good = pin_block_0("1234", PAN, TDES_KEY)

    with pytest.raises(PinBlockError):
        translate_pin_block(KeyMode.TDES, malformed, "5555555551234567", TDES_KEY, ZPK)
    with pytest.raises(SecurityError, match="ZPK must be 16 bytes"):
        translate_pin_block(KeyMode.TDES, good, PAN, TDES_KEY, bytes(8))
