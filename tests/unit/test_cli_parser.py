"""The `cardcore` command line as parsed, before anything runs."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from cardcore import admin_commands, logs
from cardcore.cli import build_parser, main


@pytest.mark.parametrize(
    ("argv", "db_url"),
    [
        (["ledger", "--db", "sqlite:///a.db", "verify"], "sqlite:///a.db"),
        (["ledger", "verify", "--db", "sqlite:///b.db"], "sqlite:///b.db"),
        (
            ["ledger", "--db", "sqlite:///a.db", "verify", "--db", "sqlite:///b.db"],
            "sqlite:///b.db",
        ),
        (["ledger", "verify"], None),
        (["ledger", "--db", "sqlite:///a.db"], "sqlite:///a.db"),
    ],
)
def test_ledger_verify_checks_the_database_named_before_or_after_verify(
    argv: list[str], db_url: str | None
) -> None:
    """`cardcore ledger --db URL verify` verified the default database: the subcommand's
    own --db (None when not given) overwrote the one given to `ledger`."""
    assert build_parser().parse_args(argv).db_url == db_url


@pytest.mark.parametrize(
    "argv",
    [
        ["pos", "purchase", "--crad", "6288880000000013"],
        ["pos", "manager-auth", "--card", "6288880000000013", "--pn", "123456"],
        ["pos", "manager-auth", "--card", "6288880000000013", "--pn=123456"],
        ["pos", "purchase", "--amount", "x6288880000000013"],
    ],
)
def test_a_usage_error_never_echoes_a_card_number_or_pin(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "cardcore: error:" in err
    assert "6288880000000013" not in err and "123456" not in err, err


def test_a_run_cancelled_by_a_second_ctrl_c_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A second Ctrl-C cancels a bulk run's task where it is: `asyncio.run` then raises
    CancelledError, which ended in a traceback (the session's diff review)."""

    async def cancelled(config: object, args: object) -> int:
        raise asyncio.CancelledError

    monkeypatch.setattr(admin_commands, "run_coupons", cancelled)
    # main() configures logging and takes SIGTERM: neither may outlive this test's process
    monkeypatch.setattr(logs, "configure", lambda *args: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.chdir(tmp_path)
    argv = ["coupons", "--db", f"sqlite:///{tmp_path / 'x.db'}", "generate", "--campaign", "C",
            "--count", "1"]  # fmt: skip
    assert main(argv) == 130
