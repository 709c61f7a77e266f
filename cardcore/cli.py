"""The `cardcore` command.

    cardcore serve           everything in one process (embedded default), optional demo data
    cardcore ledger          the ledger service
    cardcore ledger verify   recompute the hash chain and every balance from the journal
    cardcore migrate         bring the database schema up to date
    cardcore bench ledger    drive a ledger over HTTP and print one JSON line

Errors go to stderr as one line and a non-zero exit: 2 for bad usage or configuration,
1 for a failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from cardcore import bench, limits, logs, migrate
from cardcore import config as config_module
from cardcore.db import DATABASE_ERRORS, DatabaseUrlError, make_engine
from cardcore.ledger.journal import Mismatch
from cardcore.ledger.store import LedgerStore

EXIT_MISMATCH = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's usage errors, in our one-line style
        self.print_usage(sys.stderr)
        raise SystemExit(_fail(f"{self.prog}: {message}", EXIT_USAGE))


def _fail(message: str, code: int) -> int:
    print(f"cardcore: error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cardcore", description="Central card and coupon ledger server.")
    parser.add_argument("--config", help="TOML configuration file (or CARDCORE_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def server_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", dest="db_url", help="database URL (CARDCORE_DB_URL)")
        p.add_argument("--host", help="listen address (CARDCORE_HOST); loopback by default")
        p.add_argument("--port", type=int, help="listen port (CARDCORE_PORT)")

    serve = commands.add_parser(
        "serve", help="run everything in one process", description="Run everything in one process."
    )
    server_options(serve)
    serve.add_argument("--demo", action="store_true", help="load demo assets and accounts")

    ledger = commands.add_parser(
        "ledger",
        help="run the ledger service, or check it",
        description="Run the ledger service (no subcommand), or `verify` its journal.",
    )
    server_options(ledger)
    ledger_commands = ledger.add_subparsers(dest="ledger_command", parser_class=_Parser)
    verify = ledger_commands.add_parser(
        "verify",
        help="recompute the hash chain and every balance from the journal",
        description="Recompute the hash chain and every balance from the journal; "
        "exit 1 at the first mismatch.",
    )
    verify.add_argument("--db", dest="db_url", help="database URL (CARDCORE_DB_URL)")

    mig = commands.add_parser(
        "migrate", help="bring the schema up to date", description="Apply pending migrations."
    )
    mig.add_argument("--db", dest="db_url", help="database URL (CARDCORE_DB_URL)")

    bench_parser = commands.add_parser(
        "bench", help="benchmarks (one JSON line each)", description="Benchmarks."
    )
    bench_commands = bench_parser.add_subparsers(
        dest="bench_command", required=True, parser_class=_Parser
    )
    bl = bench_commands.add_parser(
        "ledger",
        help="drive a ledger over HTTP",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bl.add_argument("--url", help="a running ledger; without it one is started on --db")
    bl.add_argument("--db", help="database for the ledger started here (default: temp SQLite)")
    bl.add_argument("--token", default="", help="bearer token of the ledger at --url")
    bl.add_argument("--seconds", type=int, default=10)
    bl.add_argument("--clients", type=int, default=64)
    bl.add_argument("--accounts", type=int, default=10_000)
    bl.add_argument("--ops-per-request", type=int, default=16)
    bl.add_argument("--batch-wait-ms-max", type=int, help="writer setting for the started ledger")
    bl.add_argument("--batch-size-max", type=int, help="writer setting for the started ledger")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load(args.config)
        overrides = {k: getattr(args, k, None) for k in ("db_url", "host", "port")}
        config = config.with_overrides(overrides).check()
        logs.configure(config.log_level, config.log_format)
        return _dispatch(args, config)
    except (config_module.ConfigError, DatabaseUrlError, bench.BenchError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (migrate.NotMigrated, migrate.DatabaseUnavailable) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except DATABASE_ERRORS as exc:  # e.g. a port in use, a path under a file, a dead server
        return _fail(migrate.reason(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, config: config_module.Config) -> int:
    if args.command == "migrate":
        migrate.upgrade(config.db_url)
        print(json.dumps({"migrated": True, "revision": migrate.head_revision()}))
        return 0
    if args.command == "ledger" and args.ledger_command == "verify":
        return asyncio.run(_verify(config.db_url))
    if args.command in ("serve", "ledger"):
        from cardcore.api.server import serve  # noqa: PLC0415 - keep aiohttp off other commands

        asyncio.run(migrate.check_current(config.db_url))
        asyncio.run(serve(config, role=args.command, with_demo=getattr(args, "demo", False)))
        return 0
    options = bench.BenchOptions(
        url=args.url,
        db=args.db,
        token=args.token,
        seconds=args.seconds,
        clients=args.clients,
        accounts=args.accounts,
        ops_per_request=args.ops_per_request,
        batch_wait_ms_max=args.batch_wait_ms_max,
        batch_size_max=args.batch_size_max,
    )
    print(json.dumps(bench.run(options)))
    return 0


async def _verify(db_url: str) -> int:
    await migrate.check_current(db_url)
    store = LedgerStore(make_engine(db_url, pool_size=1))
    try:
        verifier = await store.verify(limits.VERIFY_CHUNK_BATCHES)
    except Mismatch as exc:
        print(json.dumps({"status": "mismatch", "detail": str(exc)}))
        return _fail(f"journal verification failed: {exc}", EXIT_MISMATCH)
    finally:
        await store.engine.dispose()
    summary = {
        "status": "ok",
        "batches": verifier.batches,
        "entries": verifier.entries,
        "accounts": len(verifier.balances),
        "last_hash": verifier.prev_hash,
    }
    print(json.dumps(summary))
    return 0
