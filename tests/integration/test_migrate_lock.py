"""One `cardcore migrate` of a database at a time: a second waits for the first and then finds
nothing to do (before, two at once failed one of them halfway), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from cardcore import limits, migrate
from tests.conftest import BACKENDS, _pg_exec, _pg_url_for
from tests.helpers import cardcore_env, run_cardcore

# the key migrations/env.py holds (cardcore.migrate), spelled out: a test of the contract
MIGRATE_LOCK_KEY = 0x636172646D696772


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database never migrated: a new SQLite file's path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    name = f"cardcore_mlock_{uuid.uuid4().hex[:8]}"
    try:
        asyncio.run(_pg_exec(f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    yield _pg_url_for(name)
    asyncio.run(_pg_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@contextlib.contextmanager
def _held(url: str) -> Iterator[None]:
    """The migration lock of `url`, held by this test as another migrate would hold it."""
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///")).resolve()
        with path.with_name(path.name + ".migrate-lock").open("ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield
        return

    async def connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(url)
        await conn.execute(f"SELECT pg_advisory_lock({MIGRATE_LOCK_KEY})")
        return conn

    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(connect())
    try:
        yield
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def _revision(url: str) -> str | None:
    try:
        asyncio.run(migrate.check_current(url))
    except migrate.NotMigrated:
        return None
    return migrate.head_revision()


def test_a_migrate_waits_for_one_running_and_gives_up_after_its_bound_changing_nothing(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MIGRATE_LOCK_WAIT_S", 1)
    with _held(empty_url):
        started = time.monotonic()
        with pytest.raises(migrate.NotMigrated, match="another `cardcore migrate`"):
            migrate.upgrade(empty_url)
        assert time.monotonic() - started >= 0.9  # it waited for the one running
        assert _revision(empty_url) is None  # and made nothing
    migrate.upgrade(empty_url)  # once the other has ended, it migrates
    assert _revision(empty_url) == migrate.head_revision()


def test_a_migrate_that_waited_finishes_once_the_running_one_ends(empty_url: str) -> None:
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        _held(empty_url),
    ):
        waiting = pool.submit(migrate.upgrade, empty_url)
        time.sleep(1.5)
        assert not waiting.done()  # behind the held lock, not failed and not done
    waiting.result(timeout=60)
    assert _revision(empty_url) == migrate.head_revision()


def test_two_migrate_commands_at_once_both_succeed(empty_url: str, tmp_path: Path) -> None:
    env = cardcore_env(CARDCORE_DB_URL=empty_url)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_cardcore, "migrate", cwd=tmp_path, env=env) for _ in range(2)]
        done = [run.result() for run in runs]
    for run in done:
        assert run.returncode == 0, run.stderr[-2000:]
    assert _revision(empty_url) == migrate.head_revision()
