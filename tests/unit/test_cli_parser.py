"""The `cardcore` command line as parsed, before anything runs."""

from __future__ import annotations

import pytest

from cardcore.cli import build_parser


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
