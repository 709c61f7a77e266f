"""The whole-run log scan (tests/logscan.py) sees what it must and nothing else."""

from __future__ import annotations

import logging
from pathlib import Path

from cardcore.cards.admin import new_pan
from cardcore.cards.model import mask_pan
from tests.logscan import LogScan, resident_id_ok

RESIDENT_ID = "11010519491231002X"  # the GB 11643 standard's own example


def test_a_full_card_number_an_id_number_and_a_remembered_pin_are_leaks(tmp_path: Path) -> None:
    pan = new_pan()
    scan = LogScan()
    scan.remember("pin", "739154")
    scan.keep(f'{{"msg": "purchase", "card": "{pan}"}}')
    scan.keep(f'{{"msg": "member", "id": "{RESIDENT_ID}"}}')
    server_log = tmp_path / "server.log"
    server_log.write_text('{"msg": "pin check", "pin": "739154"}\n')
    scan.files.append(server_log)
    leaks = scan.leaks()
    assert len(leaks) == 3
    assert any("card number" in x for x in leaks)
    assert any("resident ID" in x for x in leaks)
    assert any("server.log: pin" in x for x in leaks)
    assert all(pan not in x and RESIDENT_ID not in x for x in leaks)  # the report masks them


def test_masked_numbers_and_digits_inside_longer_numbers_are_not_leaks() -> None:
    scan = LogScan()
    scan.remember("pin", "7391")
    pan = new_pan()
    scan.keep(f'{{"card": "{mask_pan(pan)}", "ts_ms": 1763873915739100, "seq": 27391}}')
    scan.keep('{"id": "110105********002X"}')
    assert scan.leaks() == []


def test_the_check_character_of_an_id_number_is_verified() -> None:
    assert resident_id_ok(RESIDENT_ID)
    assert not resident_id_ok(RESIDENT_ID[:-1] + "3")


def test_records_of_every_logger_reach_the_run_scan() -> None:
    from tests import logscan  # noqa: PLC0415

    before = len(logscan.SCAN.lines) + logscan.SCAN.dropped
    logging.getLogger("cardcore.some.module").info("hello", extra={"terminal": "T1"})
    assert len(logscan.SCAN.lines) + logscan.SCAN.dropped == before + 1
    assert '"terminal": "T1"' in logscan.SCAN.lines[-1]


def test_debug_logging_keeps_the_database_drivers_quiet() -> None:
    """CARDCORE_LOG_LEVEL=DEBUG: our own loggers say everything, the drivers only their
    warnings (aiosqlite logs every statement with its values at DEBUG: sealed numbers,
    tokens, coupon codes)."""
    import logging  # noqa: PLC0415 - the root logger is put back below

    from cardcore import logs  # noqa: PLC0415

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("debug", "json")
        assert logging.getLogger("cardcore.ledger").isEnabledFor(logging.DEBUG)
        for name in ("aiosqlite", "asyncpg", "sqlalchemy.engine"):
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
            assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
