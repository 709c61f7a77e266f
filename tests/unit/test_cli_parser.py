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
