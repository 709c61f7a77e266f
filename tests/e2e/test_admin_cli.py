"""`cardcore admin ...` as real processes on a migrated database (SQLite and PostgreSQL): the
first HQ admin's token, the idempotent demo organization, and bulk issuance with its progress
bar and its print file. Every process is bounded in time (`run_cardcore`)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cardcore import admin_commands, migrate
from cardcore import config as config_module
from cardcore.cards.model import luhn_ok
from cardcore.cards.service import CardService
from tests import logscan
from tests.helpers import cardcore_env, run_cardcore, sql_rows

KEK = "5a" * 32


@pytest.fixture
def env(db_url: str) -> dict[str, str]:
    migrate.upgrade(db_url)  # a fresh SQLite file, or a database cloned from the template
    return cardcore_env(CARDCORE_DB_URL=db_url, CARDCORE_KEK=KEK, CARDCORE_LOG_LEVEL="WARNING")


def admin(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cardcore("admin", *args, cwd=tmp_path, env=env, timeout_s=120)


def answer(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("cardcore: error:")]
    return line


def test_admin_token_prints_a_new_token_of_the_first_hq_admin_each_time(
    tmp_path: Path, env: dict[str, str]
) -> None:
    first = answer(admin(tmp_path, env, "token"))
    second = answer(admin(tmp_path, env, "token", "--name", "root", "--ttl-days", "1"))
    for minted in (first, second):
        logscan.SCAN.remember("an admin token printed by the CLI", minted["token"])
    assert first["user"] == second["user"] == "root"
    assert first["token"].startswith("cc_") and first["token"] != second["token"]
    assert second["expires_at_ms"] < first["expires_at_ms"]
    assert "--ttl-days is 1.." in one_error(admin(tmp_path, env, "token", "--ttl-days", "0"))


def test_admin_demo_makes_the_demo_organization_once(tmp_path: Path, env: dict[str, str]) -> None:
    made = answer(admin(tmp_path, env, "demo"))["made"]
    assert made["entities"] == ["LE-A", "LE-B"]
    assert made["stores"] == ["S-A01", "S-A02", "S-B01"]
    assert made["classes"] == ["ORDINARY", "VIP", "BEARER", "GIFT100"]
    assert len(made["grants"]) == 6
    again = answer(admin(tmp_path, env, "demo"))["made"]
    assert again == {"entities": [], "stores": [], "classes": [], "grants": []}


def test_admin_issue_cards_writes_a_print_file_masked_unless_full_numbers_are_asked_for(
    tmp_path: Path, env: dict[str, str]
) -> None:
    answer(admin(tmp_path, env, "demo"))
    masked_file = tmp_path / "masked.csv"
    done = admin(tmp_path, env, "issue-cards", "--class", "GIFT100", "--store", "S-A01",
                 "--count", "1500", "--out", str(masked_file))  # fmt: skip
    batch = answer(done)
    assert (batch["count"], batch["last_id"] - batch["first_id"]) == (1500, 1499)
    assert "accounts [" in done.stderr and "cards    [" in done.stderr
    assert "1500/1500" in done.stderr
    with masked_file.open(encoding="ascii") as handle:
        masked = list(csv.DictReader(handle))
    assert len(masked) == 1500
    assert all(r["card_number"].startswith("628888*********") for r in masked)
    assert {(r["class_code"], r["face_value"]) for r in masked} == {("GIFT100", "")}
    full_file = tmp_path / "full.csv"
    done = admin(tmp_path, env, "issue-cards", "--class", "BEARER", "--store", "S-B01",
                 "--count", "20", "--out", str(full_file), "--full-numbers")  # fmt: skip
    assert answer(done)["full_numbers"] is True
    assert stat.S_IMODE(full_file.stat().st_mode) == 0o600
    with full_file.open(encoding="ascii") as handle:
        full = list(csv.DictReader(handle))
    for r in full:
        logscan.SCAN.remember("a card number in a print file", r["card_number"])
    assert len(full) == 20
    assert all(luhn_ok(r["card_number"]) and len(r["card_number"]) == 19 for r in full)
    assert int(full[0]["card_id"]) == batch["last_id"] + 1
    for r in full:
        assert r["card_number"] not in done.stdout + done.stderr


def test_admin_issue_cards_refusals_are_one_line_and_change_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    answer(admin(tmp_path, env, "demo"))
    base = ("issue-cards", "--store", "S-A01", "--count", "5")
    cases = [
        (("--class", "NOPE"), "class_not_found"),
        (("--class", "ORDINARY"), "class_is_named"),
        (("--class", "GIFT100", "--store", "S-X"), "store_not_found"),
    ]
    for extra, code in cases:
        assert code in one_error(admin(tmp_path, env, *base, *extra))
    no_key = {k: v for k, v in env.items() if k != "CARDCORE_KEK"}
    line = one_error(admin(tmp_path, no_key, *base, "--class", "GIFT100"))
    assert "key-encrypting key" in line
    wrong_key = {**env, "CARDCORE_KEK": "a5" * 32}  # the database knows its own (0019)
    line = one_error(admin(tmp_path, wrong_key, *base, "--class", "GIFT100"))
    assert "the key-encrypting key (kek / kek_file) is not this database's" in line, line
    too_many = one_error(admin(tmp_path, env, "issue-cards", "--class", "GIFT100", "--store",
                               "S-A01", "--count", "100001"))  # fmt: skip
    assert "--count is 1..100000" in too_many
    blocked = tmp_path / "a-file"  # an --out under a file: refused before anything is issued
    blocked.write_text("not a folder\n")
    line = one_error(admin(tmp_path, env, *base, "--class", "GIFT100",
                           "--out", str(blocked / "cards.csv")))  # fmt: skip
    assert f"--out {blocked / 'cards.csv'}:" in line, line  # the option named
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    line = one_error(admin(tmp_path, env, *base, "--class", "GIFT100", "--out", str(blocked)))
    assert f"--out {blocked}: exists; an earlier print file is never replaced" in line, (
        line
    )  # an earlier print file is kept whole
    assert blocked.read_text() == "not a folder\n"
    done = admin(tmp_path, env, "issue-cards", "--class", "GIFT100", "--store", "S-A01",
                 "--count", "1")  # fmt: skip
    assert answer(done)["first_id"] == 1  # nothing before was issued


async def test_an_issue_cut_short_after_its_cards_stand_says_so_and_what_stands(
    tmp_path: Path, env: dict[str, str], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C as the print file is being written, after the batch committed: the command
    names the cards that stand (stdout) and says not to issue them again (stderr, exit 130:
    `cli.main`). Before, it printed nothing, so an operator ran it again and issued twice."""
    answer(admin(tmp_path, env, "demo"))
    for name in ("CARDCORE_DB_URL", "CARDCORE_KEK"):
        monkeypatch.setenv(name, env[name])
    config = config_module.load(None).check()

    async def cut_short(*args: object) -> str:
        raise asyncio.CancelledError  # the run's task cancelled by Ctrl-C

    monkeypatch.setattr(CardService, "export", cut_short)
    out = tmp_path / "cards.csv"
    with pytest.raises(admin_commands.Interrupted) as caught:
        await admin_commands.issue_cards(
            config, class_code="GIFT100", store="S-A01", count=7, out=str(out),
            full_numbers=False, progress_to=io.StringIO(),
        )  # fmt: skip
    stood = caught.value.answer
    assert (stood["count"], stood["last_id"] - stood["first_id"], stood["out"]) == (7, 6, None)
    assert f"ids {stood['first_id']}..{stood['last_id']}" in str(caught.value)
    assert "do not issue them again" in str(caught.value)
    rows = await sql_rows(
        db_url, "SELECT count(*) AS n FROM cards WHERE id BETWEEN :a AND :b",
        a=stood["first_id"], b=stood["last_id"],
    )  # fmt: skip
    assert rows[0]["n"] == 7
    assert not out.exists()
