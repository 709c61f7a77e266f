"""`cardcore coupons generate` as a real process on a migrated database (SQLite and
PostgreSQL): codes in chunks with a progress bar on stderr, streamed to a 0600 CSV, the
campaign's budget counted once, and its refusals as one line on stderr."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cardcore import limits, migrate
from cardcore.coupons import model
from cardcore.coupons.service import CouponService
from cardcore.db import make_engine
from cardcore.org.service import CONSOLE, OrgService
from cardcore.records import Records
from cardcore.vault import Vault
from tests.helpers import cardcore_env, run_cardcore, sql_rows

DAY_MS = 86_400_000


@pytest.fixture
def env(db_url: str) -> dict[str, str]:
    migrate.upgrade(db_url)
    return cardcore_env(CARDCORE_DB_URL=db_url, CARDCORE_LOG_LEVEL="WARNING")


async def _campaign(db_url: str, **extra: Any) -> None:
    """Legal entity LE1 and its active amount-off campaign BULK, made as the console."""
    engine = make_engine(db_url, pool_size=1)
    try:
        records = Records(engine)
        org = OrgService(records)
        await org.create_entity(CONSOLE, "LE1", "Entity one")
        coupons = CouponService(records, org, Vault(bytes(32)))
        now = int(time.time() * 1000)
        await coupons.create_campaign(CONSOLE, {
            "code": "BULK", "name": "Bulk", "kind": "amount_off", "legal_entity": "LE1",
            "valid_from_ms": now - DAY_MS, "valid_to_ms": now + 30 * DAY_MS, "value_fen": 500,
            **extra})  # fmt: skip
        await coupons.update_campaign(CONSOLE, "BULK", {"state": "active"})
    finally:
        await engine.dispose()


def coupons(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cardcore("coupons", "generate", *args, cwd=tmp_path, env=env, timeout_s=300)


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("cardcore: error:")]
    return line


async def test_generate_writes_chunks_with_a_progress_bar_and_a_private_csv(
    tmp_path: Path, env: dict[str, str], db_url: str
) -> None:
    await _campaign(db_url, max_issued=30_000)
    count = limits.COUPON_INSERT_CHUNK_MAX * 2 + 5
    out = tmp_path / "print" / "codes.csv"
    out.parent.mkdir()
    done = coupons(tmp_path, env, "--campaign", "BULK", "--count", str(count), "--out", str(out))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    assert (answer["campaign"], answer["count"], answer["out"]) == ("BULK", count, str(out))
    assert f"] {count}/{count}" in done.stderr and f"] {count // 2}" not in done.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with out.open(encoding="ascii") as handle:
        rows = list(csv.DictReader(handle))
    written = [r["code"] for r in rows]
    assert len(written) == len(set(written)) == count
    assert all(model.parse(r["display"]) == r["code"] for r in rows[:1000])
    [stored] = await sql_rows(db_url, "SELECT count(*) AS n FROM coupon_codes")
    [batch] = await sql_rows(db_url, "SELECT count, done, state FROM coupon_batches")
    [campaign] = await sql_rows(db_url, "SELECT issued_count FROM coupon_campaigns")
    assert stored["n"] == campaign["issued_count"] == count
    assert (batch["count"], batch["done"], batch["state"]) == (count, count, "done")
    over = coupons(tmp_path, env, "--campaign", "BULK", "--count", "10000")
    assert "campaign_budget_exceeded" in one_error(over)
    before = out.read_text(encoding="ascii")
    again = one_error(
        coupons(tmp_path, env, "--campaign", "BULK", "--count", "1", "--out", str(out))
    )
    assert f"--out {out}: exists; an earlier print file is never replaced" in again, (
        again
    )  # the last run's codes are never replaced
    assert out.read_text(encoding="ascii") == before
    assert "campaign_not_found" in one_error(coupons(
        tmp_path, env, "--campaign", "NONE", "--count", "1", "--out", str(out.parent / "n.csv")
    ))  # fmt: skip
    assert [p.name for p in out.parent.iterdir()] == ["codes.csv"]  # a refusal leaves no file
    assert "--count is 1.." in one_error(coupons(tmp_path, env, "--campaign", "BULK",
                                                 "--count", "0"))  # fmt: skip
    [after] = await sql_rows(db_url, "SELECT count(*) AS n FROM coupon_codes")
    assert after["n"] == count


async def test_a_run_stopped_by_sigterm_keeps_and_reports_the_codes_that_stand(
    tmp_path: Path, env: dict[str, str], db_url: str
) -> None:
    """SIGTERM (a `timeout`, systemd) stops a bulk run as Ctrl-C does: the CSV keeps every
    code written so far, stdout names the batch and what stands, stderr says what to do, exit
    130. Before, SIGTERM killed it outright: no CSV (the codes in a hidden temporary file,
    the last ones unflushed) and no word of the batch left running with its budget."""
    await _campaign(db_url)
    out = tmp_path / "codes.csv"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cardcore", "coupons", "generate", "--campaign", "BULK",
        "--count", "500000", "--out", str(out),
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = await sql_rows(db_url, "SELECT done FROM coupon_batches")
            if rows and rows[0]["done"] >= limits.COUPON_INSERT_CHUNK_MAX:
                break
            await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        raw_out, raw_err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
    stdout, stderr = raw_out.decode(), raw_err.decode()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    answer = json.loads(stdout.splitlines()[-1])
    [line] = [x for x in stderr.splitlines() if "cardcore: error:" in x]
    assert line.startswith("cardcore: error: interrupted: "), line  # not glued to the bar
    assert f"of 500000 codes of campaign BULK stand in batch {answer['batch']}" in line, line
    [batch] = await sql_rows(db_url, "SELECT id, count, done, state FROM coupon_batches")
    assert (batch["id"], batch["count"], batch["state"]) == (answer["batch"], 500_000, "running")
    with out.open(encoding="ascii") as handle:
        written = [r["code"] for r in csv.DictReader(handle)]
    assert len(written) == answer["done"] >= limits.COUPON_INSERT_CHUNK_MAX
    assert batch["done"] - limits.COUPON_INSERT_CHUNK_MAX <= answer["done"] <= batch["done"]
    stored = await sql_rows(db_url, "SELECT code FROM coupon_codes")
    assert set(written) <= {r["code"] for r in stored}
    assert [name for name in os.listdir(tmp_path) if name.startswith(".codes")] == []
