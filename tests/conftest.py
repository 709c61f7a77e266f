"""Shared fixtures: a fresh migrated database per test, on SQLite and on PostgreSQL.

PostgreSQL comes from CARDCORE_TEST_PG_URL (default: the server at 127.0.0.1:5432). Each test
gets its own database, cloned from a template migrated once per run. With CI=true an
unreachable PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy.engine import make_url

from cardcore import migrate
from cardcore.api.app import build_app
from cardcore.cards.directory import Directory
from cardcore.cards.pos import PosService
from cardcore.config import Config
from cardcore.db import make_engine
from cardcore.frontend_gateway.security import zone_pin_reader
from cardcore.ledger.service import Ledger
from cardcore.metrics import Metrics
from cardcore.org.http import ORG_KEY
from cardcore.records import Records
from cardcore.vault import token_key_of
from tests import logscan
from tests.helpers import AdminClient, ApiClient, quiet_server

PG_URL = os.environ.get("CARDCORE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ("sqlite", "postgresql")
_RUN = uuid.uuid4().hex[:8]
_counter = itertools.count()


def _pg_admin_dsn() -> str:
    return make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_url_for(database: str) -> str:
    return make_url(PG_URL).set(database=database).render_as_string(hide_password=False)


async def _pg_exec(*statements: str) -> None:
    # 30 s: a bound for a dead server (a loaded CI run once took over 5 s to connect)
    conn = await asyncpg.connect(_pg_admin_dsn(), timeout=30)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that per-test databases are cloned from."""
    name = f"cardcore_tpl_{_RUN}"
    try:
        asyncio.run(_pg_exec(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_URL} is required in CI: {exc}")
        pytest.skip(f"PostgreSQL at {PG_URL} unreachable: {exc}")
    migrate.upgrade(_pg_url_for(name))
    yield name
    asyncio.run(_pg_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def new_pg_database(template: str) -> str:
    name = f"cardcore_t_{_RUN}_{next(_counter)}"
    asyncio.run(_pg_exec(f"CREATE DATABASE {name} TEMPLATE {template}"))
    return name


def drop_pg_database(name: str) -> None:
    asyncio.run(_pg_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that per-test databases are copied from (migrating each
    test's file took most of a second), its WAL folded into the file first."""
    path = tmp_path_factory.mktemp("template") / "ledger.db"
    migrate.upgrade(f"sqlite:///{path}")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database: one SQLite file, or one PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    databases: _PgDatabases = request.getfixturevalue("pg_databases")
    name = databases.take()
    yield _pg_url_for(name)
    databases.give_back(name)


class _PgDatabases:
    """Per-test PostgreSQL databases cloned from the template, each made before the test
    that takes it and dropped after it, in one background thread of this process (making
    and dropping took 0.3 s of every PostgreSQL test's own time)."""

    def __init__(self, template: str) -> None:
        self._template = template
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-dbs")
        self._next = self._thread.submit(new_pg_database, template)

    def take(self) -> str:
        made, self._next = self._next, self._thread.submit(new_pg_database, self._template)
        return made.result()  # a failure fails this test only: the next one is on its way

    def give_back(self, name: str) -> None:
        self._thread.submit(drop_pg_database, name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.give_back(self._next.result())
        self._thread.shutdown(wait=True)


@pytest.fixture(scope="session")
def pg_databases(pg_template: str) -> Iterator[_PgDatabases]:
    databases = _PgDatabases(pg_template)
    yield databases
    databases.close()


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[Ledger]:
    service = Ledger.open(db_url, Metrics(), batch_wait_ms_max=1)
    await service.start()
    yield service
    await service.close()


@pytest.fixture
async def records(db_url: str) -> AsyncIterator[Records]:
    """The record tables' unit of work on a pool of eight connections."""
    engine = make_engine(db_url, pool_size=8)
    try:
        yield Records(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[ApiClient]:
    metrics = Metrics()
    app = build_app(Config(db_url=db_url), metrics, Ledger.open(db_url, metrics))
    async with TestClient(await quiet_server(app)) as client:
        yield client


ADMIN_KEK = bytes(range(32))


@pytest.fixture
async def admin(db_url: str) -> AsyncIterator[AdminClient]:
    """The whole host app (ledger, POS, admin API) with a KEK, and a group HQ admin token
    made the way `cardcore admin token` makes the first one."""
    metrics = Metrics()
    ledger = Ledger.open(db_url, metrics, batch_wait_ms_max=1)
    pos = PosService(
        ledger,
        Directory(ledger.store.engine),
        token_key_of(ADMIN_KEK),
        pin_of=zone_pin_reader(ADMIN_KEK),
    )
    app = build_app(Config(db_url=db_url), metrics, ledger, pos, ADMIN_KEK)
    async with TestClient(await quiet_server(app)) as client:
        minted = await app[ORG_KEY].bootstrap_admin("root", 3600)
        yield AdminClient(client, minted["token"], app)


def pytest_configure(config: pytest.Config) -> None:
    logscan.install()


# With pytest-xdist (`make test`), each worker scans its own logs and leaves its findings in
# a folder the controller names; the controller adds them up and fails the run on a leak.
_SCANS_KEY = "cardcore_logscan_dir"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: where this worker leaves its log scan."""
    node.workerinput[_SCANS_KEY] = str(_scans_dir(node.config))


def _scans_dir(config: pytest.Config) -> Path:
    found: Path | None = getattr(config, "_cardcore_scans", None)
    if found is None:
        found = Path(tempfile.mkdtemp(prefix="cardcore-logscan-"))
        config._cardcore_scans = found  # type: ignore[attr-defined]
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any log line of it holds a card number, an ID number or a secret."""
    scan = logscan.SCAN
    figures: dict[str, Any] = {
        "records": len(scan.lines),
        "files": len(scan.files),
        "secrets": len(scan.secrets),
        "leaks": sorted(set(scan.leaks())),
    }
    worker = getattr(session.config, "workerinput", None)
    if worker is not None:  # an xdist worker: the controller reports
        folder = Path(worker[_SCANS_KEY])
        (folder / f"{worker['workerid']}.json").write_text(json.dumps(figures))
        return
    scans = getattr(session.config, "_cardcore_scans", None)
    if scans is not None:
        for path in sorted(scans.glob("*.json")):
            got = json.loads(path.read_text())
            for name in ("records", "files", "secrets"):
                figures[name] += got[name]
            figures["leaks"] = sorted({*figures["leaks"], *got["leaks"]})
        shutil.rmtree(scans, ignore_errors=True)
    leaks: list[str] = figures["leaks"]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"log scan: {figures['records']} records and {figures['files']} server logs, "
            f"{figures['secrets']} registered secrets, {len(leaks)} leaks"
        )
        for leak in leaks[:50]:
            reporter.write_line(f"  LEAK {leak}", red=True)
    if leaks and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
