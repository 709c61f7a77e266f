"""The POS gateway codec: frames, the UnionPay-style ISO 8583 layout, field helpers.

Expected bytes are written by hand from the layout rules, never produced by `encode`. Bad
messages are built with `raw` (bitmap + hand-written field bytes), also without `encode`.
"""

from __future__ import annotations

import string

import iso8583
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardcore.frontend_gateway import codec
from cardcore.frontend_gateway.codec import (
    Field60,
    Field61,
    FormatError,
    FrameError,
    Totals,
    decode,
    encode,
)

# --- helpers ---------------------------------------------------------------------------------


def raw(mti: str, fields: dict[int, str]) -> bytes:
    """A message from hand-written field bytes (hex, length prefixes included)."""
    bitmap = 0
    for number in fields:
        bitmap |= 1 << (64 - number)
    return bytes.fromhex(mti + f"{bitmap:016X}" + "".join(fields[n] for n in sorted(fields)))


def refused(body: bytes) -> FormatError:
    with pytest.raises(FormatError) as caught:
        decode(body)
    return caught.value


F3 = "000000"  # purchase
F11 = "000123"
F41 = "3132333435363738"  # "12345678"
F42 = "313233343536373839303132333435"  # "123456789012345"
ECHO = {3: F3, 11: F11, 41: F41, 42: F42}
ECHO_FIELDS = {"3": "000000", "11": "000123", "41": "12345678", "42": "123456789012345"}

PURCHASE = {
    "t": "0200",
    "2": "6222021234567890123",
    "3": "000000",
    "4": "000000012345",
    "11": "000123",
    "14": "2512",
    "22": "021",
    "25": "00",
    "26": "12",
    "35": "6222021234567890123=2512101123456",
    "41": "12345678",
    "42": "123456789012345",
    "49": "156",
    "52": "0123456789ABCDEF",
    "53": "2600000000000000",
    "55": "9F2608AABBCCDDEEFF0011",
    "60": "22000001000",
    "63": "001",
    "64": "1122334455667788",
}

PURCHASE_HEX = "".join(
    [
        "0200",  # MTI, BCD
        # bitmap: 2 3 4 | 11 14 | 22 | 25 26 | 35 | 41 42 | 49 52 53 55 | 60 63 64
        "70" "24" "04" "C0" "20" "C0" "9A" "13",
        "19" "62220212345678901230",  # F2: LL=19 digits, odd: pad nibble 0 on the right
        "000000",  # F3 n6
        "000000012345",  # F4 n12
        "000123",  # F11 n6
        "2512",  # F14 n4
        "0021",  # F22 n3: odd fixed, pad nibble 0 on the left
        "00",  # F25 n2
        "12",  # F26 n2
        # F35: LL=33 digits; '=' is nibble D; odd: pad nibble 0 on the right
        "33" "6222021234567890123D2512101123456" "0",
        "3132333435363738",  # F41 ans8 "12345678"
        "313233343536373839303132333435",  # F42 ans15 "123456789012345"
        "313536",  # F49 an3 "156"
        "08" "0123456789ABCDEF",  # F52: LL=8 bytes (format 0 PIN block)
        "2600000000000000",  # F53 n16
        "0011" "9F2608AABBCCDDEEFF0011",  # F55: LLL=11 bytes
        "0011" "22000001000" "0",  # F60: LLL=11 digits, pad nibble 0 on the right
        "0003" "303031",  # F63: LLL=3 bytes "001"
        "1122334455667788",  # F64 b8 MAC
    ]
)  # fmt: skip


# --- encode and decode -----------------------------------------------------------------------


def test_purchase_encodes_to_the_hand_written_bytes() -> None:
    assert encode(PURCHASE).hex().upper() == PURCHASE_HEX


def test_purchase_bytes_decode_to_its_fields() -> None:
    assert decode(bytes.fromhex(PURCHASE_HEX)) == PURCHASE


def test_pyiso8583_reads_our_bytes_with_spec_alike() -> None:
    doc, _ = iso8583.decode(bytes.fromhex(PURCHASE_HEX), codec.SPEC)
    del doc["p"]
    doc["35"] = doc["35"].replace("D", "=")
    assert doc == PURCHASE


@pytest.mark.parametrize("mti", sorted(codec.MTIS))
def test_every_mti_round_trips(mti: str) -> None:
    fields = {"t": mti, **ECHO_FIELDS, "60": "00000001003"}
    body = encode(fields)
    assert body[:2] == bytes.fromhex(mti)
    assert decode(body) == fields


def test_odd_length_pan_is_padded_with_zero_on_the_right() -> None:
    body = encode({"t": "0200", "2": "1234567890123456789"})
    assert body.hex().upper() == "0200" + "4000000000000000" + "19" + "12345678901234567890"
    assert decode(body)["2"] == "1234567890123456789"


def test_even_length_pan_has_no_pad() -> None:
    body = encode({"t": "0200", "2": "123456789012"})
    assert body.hex().upper() == "0200" + "4000000000000000" + "12" + "123456789012"


def test_odd_fixed_field_is_padded_with_zero_on_the_left() -> None:
    body = encode({"t": "0200", "22": "051"})
    assert body.hex().upper() == "0200" + "0000040000000000" + "0051"
    assert decode(body)["22"] == "051"


def test_track2_separator_is_nibble_d() -> None:
    body = encode({"t": "0200", "35": "622202123456=2512"})  # 17 digits, odd
    assert body.hex().upper() == "0200" + "0000000020000000" + "17" + "622202123456D2512" + "0"
    assert decode(body)["35"] == "622202123456=2512"


def test_pin_block_is_an_llvar_of_8_or_16_bytes() -> None:
    aes = "00112233445566778899AABBCCDDEEFF"
    body = encode({"t": "0200", "52": aes})
    assert body.hex().upper() == "0200" + "0000000000001000" + "16" + aes
    assert decode(body)["52"] == aes


def test_lllvar_text_length_counts_bytes() -> None:
    body = encode({"t": "0500", "48": "A" * 123})
    assert body.hex().upper() == "0500" + "0000000000010000" + "0123" + "41" * 123


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"t": "0100"}, "MTI"),
        ({"t": "0200", "5": "000000000001"}, "not in our message layout"),
        ({"t": "0200", "4": "00000000001A"}, "field 4"),
        ({"t": "0200", "2": "12345678901"}, "field 2"),
        ({"t": "0200", "35": "62220212345678901232512"}, "field 35"),
        ({"t": "0200", "41": "1234567\n"}, "field 41"),
        ({"t": "0200", "37": "12345678901-"}, "field 37"),
        ({"t": "0200", "52": "00" * 10}, "field 52"),
        ({"t": "0200", "44": ""}, "field 44"),
        ({"t": "0200", "64": "XYZ"}, "field 64"),
    ],
)
def test_encode_refuses_what_decode_would_refuse(fields: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        encode(fields)


# --- decode rejections (pyiso8583 would accept several of these) -----------------------------


def test_pyiso8583_alone_accepts_hex_digits_in_a_bcd_field() -> None:
    body = raw("0200", {**ECHO, 11: "00012A"})
    doc, _ = iso8583.decode(body, codec.SPEC)
    assert doc["11"] == "00012A"  # why decode checks every n field itself


def test_hex_digit_in_numeric_field_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 11: "00012A"}))
    assert (error.code, error.field, error.mti) == ("30", "11", "0200")


def test_hex_digit_in_amount_is_an_invalid_amount() -> None:
    error = refused(raw("0200", {**ECHO, 4: "0000000012F5"}))
    assert (error.code, error.field) == ("13", "4")


def test_hex_digit_in_pan_is_an_invalid_card() -> None:
    error = refused(raw("0200", {**ECHO, 2: "16" + "62220212345678A0"}))
    assert (error.code, error.field) == ("14", "2")


def test_pan_shorter_than_12_digits_is_an_invalid_card() -> None:
    error = refused(raw("0200", {**ECHO, 2: "11" + "622202123450"}))  # 11 digits + pad
    assert (error.code, error.field) == ("14", "2")


def test_track2_with_a_nibble_other_than_digit_or_separator_is_an_invalid_card() -> None:
    error = refused(raw("0200", {**ECHO, 35: "17" + "622202123456E2512" + "0"}))
    assert (error.code, error.field) == ("14", "35")


def test_track2_without_separator_is_an_invalid_card() -> None:
    error = refused(raw("0200", {**ECHO, 35: "16" + "6222021234562512"}))
    assert (error.code, error.field) == ("14", "35")


def test_control_byte_in_text_field_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 41: "31323334353637" + "0A"}))
    assert (error.code, error.field) == ("30", "41")


def test_non_ascii_byte_in_text_field_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 42: "3132333435363738393031323334" + "C3"}))
    assert (error.code, error.field) == ("30", "42")


def test_delete_byte_in_text_field_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 63: "0003" + "30307F"}))
    assert (error.code, error.field) == ("30", "63")


@pytest.mark.parametrize(
    ("number", "value"),
    [(37, "31323334353637383930312D"), (38, "313233203536"), (39, "302E"), (49, "31352F")],
)
def test_non_alphanumeric_in_an_field_is_a_format_error(number: int, value: str) -> None:
    error = refused(raw("0210", {**ECHO, number: value}))
    assert (error.code, error.field) == ("30", str(number))


def test_an_field_accepts_letters_and_digits() -> None:
    body = raw("0210", {**ECHO, 38: "41423132337A", 39: "4130"})
    assert (decode(body)["38"], decode(body)["39"]) == ("AB123z", "A0")


def test_trailing_bytes_are_a_format_error() -> None:
    error = refused(raw("0200", ECHO) + b"\x00")
    assert (error.code, error.field) == ("30", "end")
    assert error.fields == {"t": "0200", **ECHO_FIELDS}


def test_message_truncated_inside_a_field_is_a_format_error() -> None:
    error = refused(raw("0200", ECHO)[:-3])
    assert (error.code, error.field) == ("30", "42")
    assert error.fields == {"t": "0200", "3": "000000", "11": "000123", "41": "12345678"}


def test_every_truncation_of_the_purchase_is_refused() -> None:
    body = bytes.fromhex(PURCHASE_HEX)
    for cut in range(len(body)):
        error = refused(body[:cut])
        # 14 when the cut is in the card field (section 2: the card is what to read again)
        assert error.code == ("14" if error.field in ("2", "35") else "30"), cut


def test_message_truncated_inside_a_length_prefix_is_a_format_error() -> None:
    error = refused(raw("0200", {3: F3, 48: "01"}))
    assert (error.code, error.field) == ("30", "48")


def test_message_truncated_inside_the_bitmap_is_a_format_error() -> None:
    error = refused(bytes.fromhex("0200" + "7024"))
    assert (error.code, error.field, error.fields) == ("30", "p", {"t": "0200"})


@pytest.mark.parametrize("body", [b"", b"\x02"])
def test_message_without_mti_is_a_format_error(body: bytes) -> None:
    error = refused(body)
    assert (error.code, error.field, error.mti, error.fields) == ("30", "t", None, {})


def test_secondary_bitmap_is_a_format_error() -> None:
    secondary = bytes.fromhex("0200" + "A020000000800000" + "0000000000000001" + F3 + F11 + F41)
    error = refused(secondary)
    assert (error.code, error.field) == ("30", "1")
    assert error.fields == {"t": "0200", "3": "000000", "11": "000123", "41": "12345678"}


def test_field_outside_our_layout_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 18: "5411"}))
    assert (error.code, error.field) == ("30", "18")
    assert error.fields == {"t": "0200", "3": "000000", "11": "000123"}  # fields before F18


@pytest.mark.parametrize(
    ("number", "value"),
    [
        (2, "20" + "12345678901234567890"),  # 20 digits > 19
        (44, "26" + "41" * 26),  # 26 bytes > 25
        (48, "0323" + "41" * 323),  # 323 bytes > 322
        (52, "17" + "00" * 17),  # 17 bytes > 16
    ],
)
def test_variable_length_over_the_maximum_is_a_format_error(number: int, value: str) -> None:
    error = refused(raw("0200", {**ECHO, number: value}))
    code = "14" if number == 2 else "30"  # a card field that cannot be framed: 14
    assert (error.code, error.field) == (code, str(number))


def test_length_prefix_that_is_not_bcd_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 32: "0A" + "123456789010"}))
    assert (error.code, error.field) == ("30", "32")


def test_empty_variable_field_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 44: "00"}))
    assert (error.code, error.field) == ("30", "44")


def test_pin_block_of_neither_8_nor_16_bytes_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 52: "10" + "00" * 10}))
    assert (error.code, error.field) == ("30", "52")


def test_nonzero_pad_nibble_is_a_format_error() -> None:
    error = refused(raw("0200", {**ECHO, 2: "19" + "1234567890123456789F"}))
    assert (error.code, error.field) == ("14", "2")  # the card field: 14 (section 2)
    left = refused(raw("0200", {**ECHO, 22: "1021"}))
    assert (left.code, left.field) == ("30", "22")


def test_unknown_mti_is_an_invalid_transaction_with_fields_recovered() -> None:
    error = refused(raw("0100", ECHO))
    assert (error.code, error.field, error.mti) == ("12", "t", "0100")
    assert error.fields == {"t": "0100", **ECHO_FIELDS}


# STAN, time and date: digits that must also make sense (docs/card-protocol.md section 4).


@pytest.mark.parametrize("stan", ["000001", "000123", "999999"])
def test_stan_000001_to_999999_is_accepted(stan: str) -> None:
    assert decode(raw("0200", {**ECHO, 11: stan}))["11"] == stan


def test_stan_000000_is_a_format_error_and_not_recovered() -> None:
    error = refused(raw("0200", {**ECHO, 11: "000000"}))
    assert (error.code, error.field, error.mti) == ("30", "11", "0200")
    assert "11" not in error.fields  # never echoed: the reply must decode at the terminal
    assert error.fields == {"t": "0200", "3": "000000", "41": "12345678", "42": "123456789012345"}


@pytest.mark.parametrize("hhmmss", ["000000", "120000", "235959", "095930"])
def test_a_valid_local_time_is_accepted(hhmmss: str) -> None:
    assert decode(raw("0200", {**ECHO, 12: hhmmss}))["12"] == hhmmss


@pytest.mark.parametrize("hhmmss", ["240000", "250101", "996000", "126000", "120060", "235999"])
def test_an_impossible_local_time_is_a_format_error(hhmmss: str) -> None:
    error = refused(raw("0200", {**ECHO, 12: hhmmss}))
    assert (error.code, error.field) == ("30", "12")
    assert error.fields == {"t": "0200", **ECHO_FIELDS}  # the rest still recovered


@pytest.mark.parametrize("mmdd", ["0101", "0131", "0228", "0229", "0331", "0430", "1130", "1231"])
def test_a_valid_local_date_is_accepted_and_0229_always(mmdd: str) -> None:
    assert decode(raw("0200", {**ECHO, 13: mmdd}))["13"] == mmdd


@pytest.mark.parametrize(
    "mmdd", ["0000", "0001", "0100", "1301", "9901", "0132", "0230", "0431", "0631", "0931", "1131"]
)
def test_an_impossible_local_date_is_a_format_error(mmdd: str) -> None:
    error = refused(raw("0200", {**ECHO, 13: mmdd}))
    assert (error.code, error.field) == ("30", "13")
    assert error.fields == {"t": "0200", **ECHO_FIELDS}


@pytest.mark.parametrize(("key", "value"), [("11", "000000"), ("12", "240000"), ("13", "0230")])
def test_encode_refuses_an_impossible_stan_time_or_date(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"field {key} must be"):
        encode({"t": "0200", key: value})


def test_mti_that_is_not_bcd_is_a_format_error() -> None:
    error = refused(raw("0A00", ECHO))
    assert (error.code, error.field, error.mti) == ("30", "t", None)


def test_format_error_recovers_the_reply_fields_but_no_card_data() -> None:
    body = raw("0200", {**ECHO, 2: "166222021234567890", 4: "00000000001A"})
    error = refused(body)
    assert (error.code, error.field) == ("13", "4")
    assert error.fields == {"t": "0200", **ECHO_FIELDS}  # F2 is decodable but never recovered


def test_first_fault_in_message_order_is_reported() -> None:
    error = refused(raw("0200", {**ECHO, 4: "00000000001A", 41: "0A" * 8}))
    assert (error.code, error.field) == ("13", "4")


# --- MAC -------------------------------------------------------------------------------------


def test_mac_is_computed_over_the_message_without_f64_then_set() -> None:
    fields = codec.with_mac_placeholder({"t": "0200", **ECHO_FIELDS})
    assert fields["64"] == "0000000000000000"
    body = encode(fields)
    covered = codec.mac_input(body)
    assert covered == body[:-8]
    assert covered == raw("0200", {**ECHO, 64: ""})  # MTI, bitmap with bit 64, F3..F42
    signed = codec.set_mac(body, bytes.fromhex("A1B2C3D4E5F60718"))
    assert signed[:-8] == covered
    assert decode(signed)["64"] == "A1B2C3D4E5F60718"


def test_mac_helpers_refuse_a_message_without_f64() -> None:
    body = encode({"t": "0200", **ECHO_FIELDS})
    with pytest.raises(ValueError, match="field 64"):
        codec.mac_input(body)
    with pytest.raises(ValueError, match="field 64"):
        codec.set_mac(body, bytes(8))


def test_set_mac_refuses_a_mac_of_the_wrong_size() -> None:
    body = encode(codec.with_mac_placeholder({"t": "0200", **ECHO_FIELDS}))
    with pytest.raises(ValueError, match="MAC is 7 bytes"):
        codec.set_mac(body, bytes(7))


def test_response_mti_adds_ten() -> None:
    assert [codec.response_mti(m) for m in ("0200", "0220", "0400", "0800", "0820")] == [
        "0210",
        "0230",
        "0410",
        "0810",
        "0830",
    ]
    with pytest.raises(ValueError, match="not a request"):
        codec.response_mti("0210")


@pytest.mark.parametrize(("mti", "reply"), [("0100", "0110"), ("0420", "0430"), ("0120", "0130")])
def test_a_request_mti_we_do_not_serve_has_a_response_mti_that_encodes(
    mti: str, reply: str
) -> None:
    assert codec.response_mti(mti) == reply
    body = encode({"t": reply, **ECHO_FIELDS, "39": "12"})
    assert body[:2] == bytes.fromhex(reply)
    with pytest.raises(FormatError):  # never taken from a terminal
        decode(body)


@pytest.mark.parametrize("mti", ["0110", "0140", "0190", "0210", "0A00", "020", "02000"])
def test_an_mti_without_a_response_form_has_no_response_mti(mti: str) -> None:
    with pytest.raises(ValueError, match="not a request"):
        codec.response_mti(mti)


@pytest.mark.parametrize("mti", ["0100", "0140", "9999", "0A00", "020"])
def test_encode_refuses_an_mti_that_is_neither_ours_nor_a_response(mti: str) -> None:
    with pytest.raises(ValueError, match="MTI"):
        encode({"t": mti, **ECHO_FIELDS})


# --- framing ---------------------------------------------------------------------------------

TPDU = bytes.fromhex("6000030000")  # id 60, destination 0003, source 0000
HEADER = bytes.fromhex("603100311300")  # POS, version 31, status 0 / processing 0, reserved


def test_split_frame_cuts_tpdu_header_and_message() -> None:
    frame = codec.split_frame(TPDU + HEADER + bytes.fromhex("0800"))
    assert frame == codec.Frame(tpdu=TPDU, header=HEADER, body=bytes.fromhex("0800"))


def test_frame_shorter_than_tpdu_header_and_mti_is_refused() -> None:
    with pytest.raises(FrameError):
        codec.split_frame(TPDU + HEADER + b"\x08")


def test_frame_with_a_tpdu_id_other_than_60_is_refused() -> None:
    with pytest.raises(FrameError):
        codec.split_frame(bytes.fromhex("6100030000") + HEADER + bytes.fromhex("0800"))


def test_reply_tpdu_swaps_destination_and_source() -> None:
    assert codec.reply_tpdu(bytes.fromhex("6000031234")) == bytes.fromhex("6012340003")


def test_reply_header_sets_the_processing_nibble_only() -> None:
    header = bytes.fromhex("6031A5000000")  # status nibble A, processing 5
    assert codec.reply_header(header, processing=codec.PROCESSING_SIGN_ON) == bytes.fromhex(
        "6031A3000000"
    )
    assert codec.reply_header(header, processing=codec.PROCESSING_NONE) == bytes.fromhex(
        "6031A0000000"
    )
    with pytest.raises(ValueError, match="not a nibble"):
        codec.reply_header(header, processing=16)


def test_pack_frame_prefixes_the_big_endian_length() -> None:
    body = bytes.fromhex("08100000000000000000")
    assert codec.pack_frame(TPDU, HEADER, body) == b"\x00\x15" + TPDU + HEADER + body


def test_pack_frame_refuses_more_than_65535_bytes() -> None:
    assert len(codec.pack_frame(TPDU, HEADER, bytes(65535 - 11))) == 65537
    with pytest.raises(ValueError, match="65536 bytes"):
        codec.pack_frame(TPDU, HEADER, bytes(65535 - 10))


def test_frame_length_refuses_short_and_over_the_cap() -> None:
    assert codec.frame_length(b"\x00\x0d", frame_bytes_max=2048) == 13
    assert codec.frame_length(b"\x08\x00", frame_bytes_max=2048) == 2048
    for prefix in (b"\x00\x00", b"\x00\x0c", b"\x08\x01", b"\xff\xff"):
        with pytest.raises(FrameError):
            codec.frame_length(prefix, frame_bytes_max=2048)


# --- field helpers ---------------------------------------------------------------------------


def test_f60_parses_and_formats_its_three_parts() -> None:
    assert codec.parse_f60("22000001003") == Field60("22", "000001", "003")
    assert codec.parse_f60("22000001") == Field60("22", "000001", "000")
    assert codec.parse_f60("22000001003" + "600234") == Field60("22", "000001", "003")
    # 60.6 (the 14th digit) = 1: the terminal takes a partial approval; the rest is ignored.
    partial = Field60("22", "000001", "000", partial_approval=True)
    assert codec.parse_f60("22000001000" + "601234") == partial
    assert codec.format_f60(partial) == "22000001000001"
    assert codec.format_f60(Field60("00", "123456", "001")) == "00123456001"


@pytest.mark.parametrize("value", ["2200000", "220000010", "2200000100", "2200000100A", "2" * 18])
def test_f60_refuses_bad_lengths_and_non_digits(value: str) -> None:
    with pytest.raises(FormatError) as caught:
        codec.parse_f60(value)
    assert (caught.value.code, caught.value.field) == ("30", "60")


def test_f60_record_refuses_bad_parts() -> None:
    with pytest.raises(ValueError, match="transaction type"):
        Field60("2", "000001", "000")


def test_f61_parses_and_formats_batch_stan_and_date() -> None:
    assert codec.parse_f61("000001000123") == Field61("000001", "000123", "")
    assert codec.parse_f61("0000010001230615") == Field61("000001", "000123", "0615")
    assert codec.parse_f61("0000010001230615" + "1" * 13) == Field61("000001", "000123", "0615")
    assert codec.format_f61(Field61("000001", "000123", "0615")) == "0000010001230615"
    assert codec.format_f61(Field61("000001", "000123")) == "000001000123"


@pytest.mark.parametrize(
    "value", ["00000100012", "0000010001230", "000001000123061", "00000100012A"]
)
def test_f61_refuses_bad_lengths_and_non_digits(value: str) -> None:
    with pytest.raises(FormatError) as caught:
        codec.parse_f61(value)
    assert (caught.value.code, caught.value.field) == ("30", "61")


def test_tlv_round_trips() -> None:
    items = [("PT", "000120"), ("C1", ""), ("zz", "a b=c")]
    text = codec.tlv_encode(items)
    assert text == "PT006000120C1000zz005a b=c"
    assert codec.tlv_decode(text) == items
    assert codec.tlv_decode("") == []


@pytest.mark.parametrize(
    "text",
    ["P", "P-001x", "PT01", "PT0A1x", "PT005abc", "PT003a\x01c", "PT003ab\u00e9"],
)
def test_tlv_decode_refuses_malformed_data(text: str) -> None:
    with pytest.raises(FormatError) as caught:
        codec.tlv_decode(text)
    assert (caught.value.code, caught.value.field) == ("30", "48")


@pytest.mark.parametrize(
    "items", [[("P", "x")], [("P-", "x")], [("PT", "\n")], [("PT", "x" * 1000)]]
)
def test_tlv_encode_refuses_bad_items(items: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="TLV"):
        codec.tlv_encode(items)


def test_request_totals_take_the_flag_0() -> None:
    text = "0000000123450030000000001000010"
    assert codec.parse_request_totals(text) == Totals(12345, 3, 100, 1)
    assert codec.parse_request_totals(text + "999") == Totals(12345, 3, 100, 1)


@pytest.mark.parametrize("flag", ["1", "2", "3", "9"])
def test_request_totals_with_another_flag_are_a_format_error(flag: str) -> None:
    with pytest.raises(FormatError) as caught:
        codec.parse_request_totals("000000012345003000000000100001" + flag)
    assert (caught.value.code, caught.value.field) == ("30", "48")
    assert codec.parse_totals("000000012345003000000000100001" + flag)  # a reply's flag


def test_totals_parse_and_format() -> None:
    text = "0000000123450030000000001000010"
    assert codec.parse_totals(text) == Totals(12345, 3, 100, 1)
    assert codec.parse_totals(text + "000000000000000000000000000000") == Totals(12345, 3, 100, 1)
    assert codec.format_totals(Totals(12345, 3, 100, 1), "1") == text[:-1] + "1"


@pytest.mark.parametrize("text", ["0" * 30, "0" * 12 + "00A" + "0" * 16])
def test_totals_refuse_short_or_non_digit_text(text: str) -> None:
    with pytest.raises(FormatError) as caught:
        codec.parse_totals(text)
    assert (caught.value.code, caught.value.field) == ("30", "48")


@pytest.mark.parametrize(
    ("totals", "flag"),
    [
        (Totals(10**12, 0, 0, 0), "1"),
        (Totals(0, 1000, 0, 0), "1"),
        (Totals(0, 0, -1, 0), "1"),
        (Totals(0, 0, 0, 0), "12"),
    ],
)
def test_format_totals_refuses_what_does_not_fit(totals: Totals, flag: str) -> None:
    with pytest.raises(ValueError, match=r"does not fit|1 digit"):
        codec.format_totals(totals, flag)


def test_balance_is_signed_with_c_or_d() -> None:
    assert codec.format_balance(12345) == "0002156C000000012345"
    assert codec.format_balance(-5, currency="344") == "0002344D000000000005"
    assert codec.parse_balance("0002156C000000012345") == 12345
    assert codec.parse_balance("0002156D000000000005") == -5
    with pytest.raises(ValueError, match="does not fit"):
        codec.format_balance(10**12)


@pytest.mark.parametrize(
    "text",
    ["0002156X000000012345", "0002156C00000001234", "0002156C00000001234A", "00A2156C000000012345"],
)
def test_parse_balance_refuses_malformed_entries(text: str) -> None:
    with pytest.raises(FormatError) as caught:
        codec.parse_balance(text)
    assert (caught.value.code, caught.value.field) == ("30", "54")


def test_stan_and_batch_wrap_to_000001_never_000000() -> None:
    assert codec.next_stan("000001") == "000002"
    assert codec.next_stan("999999") == "000001"
    assert codec.next_batch("999999") == "000001"
    assert codec.next_batch("000000") == "000001"
    with pytest.raises(ValueError, match="6 digits"):
        codec.next_stan("12345")


# --- properties ------------------------------------------------------------------------------

_ANS = "".join(chr(c) for c in range(0x20, 0x7F))
_AN = string.ascii_letters + string.digits


def _value(key: str) -> st.SearchStrategy[str]:
    field = codec.LAYOUT[key]
    low = field.max_len if field.prefix_bytes == 0 else field.min_len
    high = field.max_len
    if key == "11":
        return st.integers(1, 999_999).map(lambda n: f"{n:06d}")
    if key == "12":
        return st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(0, 59)).map(
            lambda t: f"{t[0]:02d}{t[1]:02d}{t[2]:02d}"
        )
    if key in ("13", "15"):
        return st.dates().map(lambda d: d.strftime("%m%d"))  # 0229 of leap years too
    if key == "14":
        return st.dates().map(lambda d: d.strftime("%y%m"))
    if key == "52":
        return st.sampled_from([8, 16]).flatmap(
            lambda n: st.binary(min_size=n, max_size=n).map(lambda b: b.hex().upper())
        )
    if field.kind == "z":
        return st.tuples(
            st.text(string.digits, min_size=12, max_size=19), st.text(string.digits, max_size=17)
        ).map(lambda parts: f"{parts[0]}={parts[1]}")
    if field.kind == "b":
        return st.binary(min_size=low, max_size=high).map(lambda b: b.hex().upper())
    alphabet = {"n": string.digits, "an": _AN, "ans": _ANS}[field.kind]
    return st.text(alphabet, min_size=low, max_size=high)


_MESSAGES = st.fixed_dictionaries(
    {"t": st.sampled_from(sorted(codec.MTIS))},
    optional={key: _value(key) for key in codec.LAYOUT},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_MESSAGES)
def test_any_valid_message_round_trips_and_pyiso8583_agrees(fields: dict[str, str]) -> None:
    body = encode(fields)
    assert decode(body) == fields
    doc, _ = iso8583.decode(body, codec.SPEC)
    del doc["p"]
    if "35" in doc:
        doc["35"] = doc["35"].replace("D", "=")
    assert doc == fields
    # Our encoder writes exactly what pyiso8583 writes with SPEC (docs/adr/0005).
    reference = dict(fields)
    if "35" in reference:
        reference["35"] = reference["35"].replace("=", "D")
    encoded, _ = iso8583.encode(reference, codec.SPEC)
    assert bytes(encoded) == body


def _check_decode(body: bytes) -> None:
    """decode answers fields or a FormatError; what it accepts is canonical and pyiso8583
    reads it the same way."""
    try:
        fields = decode(body)
    except FormatError as exc:
        error: FormatError | None = exc
    else:
        error = None
    if error is not None:
        assert error.code in {"12", "13", "14", "30"}
        assert error.field
        assert set(error.fields) <= codec.RECOVERABLE_FIELDS | {"t"}
        return
    assert encode(fields) == body
    doc, _ = iso8583.decode(body, codec.SPEC)
    assert doc.pop("p")
    if "35" in doc:
        doc["35"] = doc["35"].replace("D", "=")
    assert doc == fields


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_format_error(body: bytes) -> None:
    _check_decode(body)


_KNOWN_BITS = sum(1 << (64 - int(key)) for key in codec.LAYOUT)
_BITMAPS = st.integers(0, 2**64 - 1).flatmap(lambda b: st.sampled_from([b, b & _KNOWN_BITS]))


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(sorted(codec.MTIS)), _BITMAPS, st.binary(max_size=200))
def test_random_fields_after_a_good_header_only_ever_raise_format_error(
    mti: str, bitmap: int, rest: bytes
) -> None:
    _check_decode(bytes.fromhex(mti) + bitmap.to_bytes(8, "big") + rest)


_SAMPLE = {
    **PURCHASE,
    "12": "235959",
    "13": "1231",
    "15": "0101",
    "23": "001",
    "32": "12345678901",
    "37": "123456789012",
    "38": "AB12cd",
    "39": "00",
    "44": "ISSUER 0001 ~ OK",
    "48": "PT006000120C1000",
    "54": "0002156C000000012345",
    "61": "0000010001230615",
    "62": "0123456789ABCDEF" * 4,
}
# Valid messages to mutate: every field alone, then all of them, then the purchase.
_POOL = [
    *(encode({"t": "0200", key: _SAMPLE[key]}) for key in codec.LAYOUT),
    encode({**_SAMPLE, "t": "0210"}),
    bytes.fromhex(PURCHASE_HEX),
]
_MUTATION = st.tuples(
    st.sampled_from(["set", "insert", "delete"]), st.integers(0, 400), st.integers(0, 255)
)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(_POOL), st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_valid_messages_only_ever_raise_format_error(
    valid: bytes, mutations: list[tuple[str, int, int]]
) -> None:
    body = bytearray(valid)
    for kind, where, byte in mutations:
        at = where % (len(body) + 1)
        if kind == "insert":
            body.insert(at, byte)
        elif at < len(body):
            if kind == "set":
                body[at] = byte
            else:
                del body[at]
    _check_decode(bytes(body))
