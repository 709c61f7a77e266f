"""The `cardcore` command.

    cardcore serve           everything in one process (embedded default), optional demo data
    cardcore ledger          the ledger service
    cardcore ledger verify   recompute the hash chain and every balance from the journal
    cardcore migrate         bring the database schema up to date
    cardcore gateway         the POS front-end gateway alone, calling ledgers over HTTP
    cardcore pos ACTION      a POS terminal: sign on, buy, void, refund, points, coupons,
                             reverse, settle ...
    cardcore terminal add    register a POS terminal with a running host (master key once)
    cardcore card issue      issue stored-value cards through a running host
    cardcore admin ...       bootstrap: first HQ admin token, card batches, demo organization
    cardcore coupons generate  a campaign's codes in bulk, CSV for printing
    cardcore keys init       create the key-encrypting key file
    cardcore bench ledger    drive a ledger over HTTP and print one JSON line
    cardcore bench pos       drive simulated terminals through a gateway; one JSON line

Errors go to stderr as one line and a non-zero exit: 2 for bad usage or configuration,
1 for a failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

from cardcore import admin_commands, bench, bench_pos, limits, logs, migrate, pos_commands, runtime
from cardcore import config as config_module
from cardcore.db import DATABASE_ERRORS, DatabaseUrlError, make_engine
from cardcore.frontend_gateway.saf import SafError
from cardcore.ledger.journal import Mismatch
from cardcore.ledger.store import LedgerStore, WriterLockError

EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, also for a SIGTERM (`_interrupt`)
SERVERS = ("serve", "ledger", "gateway")  # shut down gracefully on SIGTERM themselves
POS_ACTIONS = (
    "sign-on", "echo", "inquiry", "purchase", "void", "refund", "topup", "settle", "sign-off",
    "points-earn", "points-redeem", "points-return", "coupon-query", "coupon-reserve",
    "coupon-redeem", "coupon-reverse", "service-redeem", "manager-auth", "reverse", "script",
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's usage errors, in our one-line style
        self.print_usage(sys.stderr)
        raise SystemExit(_fail(f"{self.prog}: {_unsecret(message)}", EXIT_USAGE))


_UNRECOGNIZED = "unrecognized arguments: "


def _unsecret(message: str) -> str:
    """An argparse error without the values it would echo: a mistyped option's value (`--crad
    NUMBER`, `--pn PIN`) is left out, and a run of 12 or more digits (a card number) is
    masked. An error names the option, never its value."""
    if message.startswith(_UNRECOGNIZED):
        words = message.removeprefix(_UNRECOGNIZED).split()
        shown = [w.partition("=")[0] + ("=..." if "=" in w else "") if w.startswith("-")
                 else "..." for w in words]  # fmt: skip
        message = _UNRECOGNIZED + " ".join(shown)
    return re.sub(r"\d{12,}", lambda m: m.group()[:6] + "*" * (len(m.group()) - 6), message)


def _fail(message: str, code: int) -> int:
    print(f"cardcore: error: {message}", file=sys.stderr)
    return code


def _shares(text: str) -> tuple[int, ...]:
    """`--shares P,C,R`: whole percentages (their sum is checked with the other options)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("three whole percentages, as 70,20,10") from None


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one statement per option
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
    # SUPPRESS: `cardcore ledger --db URL verify` keeps the ledger's --db (a subparser's
    # default would overwrite it with None, and verify would check the default database)
    verify.add_argument(
        "--db", dest="db_url", default=argparse.SUPPRESS, help="database URL (CARDCORE_DB_URL)"
    )

    mig = commands.add_parser(
        "migrate", help="bring the schema up to date", description="Apply pending migrations."
    )
    mig.add_argument("--db", dest="db_url", help="database URL (CARDCORE_DB_URL)")

    gw = commands.add_parser(
        "gateway",
        help="run the POS front-end gateway alone",
        description="Run the POS front-end gateway; it calls the ledgers over HTTP and never "
        "touches a database.",
    )
    gw.add_argument("--ledger", help="ledger URLs, comma-separated (CARDCORE_GATEWAY_LEDGER_URLS)")
    gw.add_argument("--host", dest="gateway_host", help="terminal listen address")
    gw.add_argument("--port", dest="gateway_port", type=int, help="terminal listen port")

    pos = commands.add_parser(
        "pos",
        help="a POS terminal simulator",
        description="A POS terminal on the documented card protocol (docs/card-protocol.md). "
        "Every run signs on, sends any reversal still owed, then does ACTION and prints the "
        "reply: its response code and what it carries. The points-, coupon-, service- and "
        "manager- actions are the messages of section 5.11. reverse sends a 0400 of the "
        "terminal's last financial request of this batch, or of --original-stan; unanswered, "
        "it is owed and sent again at the next run. script: the demo's scripted session. "
        "Defaults: the demo terminal.",
    )
    pos.add_argument("action", choices=POS_ACTIONS, metavar="ACTION", help=", ".join(POS_ACTIONS))
    pos.add_argument("--gateway", help="HOST:PORT of the gateway (default from configuration)")
    pos.add_argument("--tid", default="DEMO0001", help="terminal id (F41)")
    pos.add_argument("--mid", default="DEMO00000000001", help="merchant id (F42)")
    pos.add_argument("--tmk", default="", help="terminal master key, hex (default: the demo's)")
    pos.add_argument("--key-mode", default="aes", choices=["aes", "3des"])
    pos.add_argument("--card", default="", help="card number (manager-auth: the manager's)")
    pos.add_argument("--pin", default=None, help="PIN (sent as an enciphered PIN block)")
    pos.add_argument(
        "--amount", type=int, default=None, help="amount in fen (coupons, manager-auth: the bill)"
    )
    pos.add_argument(
        "--original-stan",
        default="",
        help="void, refund, coupon-reverse, reverse: the original's STAN; coupon-redeem: its "
        "reservation's (the redeem goes under it)",
    )
    pos.add_argument("--original-batch", default="", help="refund: the original's batch")
    pos.add_argument(
        "--rrn", default="", help="refund, points-return: the original's reference number"
    )
    pos.add_argument("--points", type=int, default=None, help="points-redeem: points to spend")
    pos.add_argument("--coupon", default="", help="coupon-*: the code as printed, or QR text")
    pos.add_argument("--sale", default="", help="coupon-*: sale number (one sale's coupons)")
    pos.add_argument("--product", default="", help="service-redeem: product (else the host picks)")
    pos.add_argument("--uses", type=int, default=None, help="service-redeem: uses (default 1)")
    pos.add_argument("--discount", type=int, default=None, help="manager-auth: discount in fen")
    pos.add_argument("--reason", default="", help="manager-auth: reason code")
    pos.add_argument("--state", default="", help="terminal state file (data/pos-TID.json)")
    pos.add_argument(
        "--raw",
        action="store_true",
        help="also print the frames in hex (card number masked, PIN block and keys starred)",
    )

    term = commands.add_parser("terminal", help="POS terminals", description="POS terminals.")
    term_commands = term.add_subparsers(
        dest="terminal_command", required=True, parser_class=_Parser
    )
    tadd = term_commands.add_parser(
        "add",
        help="register a terminal; prints its master key once",
        description="Register a terminal with a running host; prints its master key once.",
    )
    tadd.add_argument("--url", help="the host (default http://HOST:PORT from configuration)")
    tadd.add_argument("--tid", required=True, help="terminal id, 8 letters or digits")
    tadd.add_argument("--mid", required=True, help="merchant id, 15 letters or digits")
    tadd.add_argument("--store", required=True)
    tadd.add_argument("--legal-entity", required=True)
    tadd.add_argument("--key-mode", default="aes", choices=["aes", "3des"])

    card = commands.add_parser("card", help="cards", description="Cards.")
    card_commands = card.add_subparsers(dest="card_command", required=True, parser_class=_Parser)
    cissue = card_commands.add_parser(
        "issue",
        help="issue stored-value cards",
        description="Issue stored-value cards through a running host; their numbers are "
        "written to --out (CSV) or printed, once.",
    )
    cissue.add_argument("--url", help="the host (default http://HOST:PORT from configuration)")
    cissue.add_argument("--legal-entity", required=True)
    cissue.add_argument("--count", type=int, default=1)
    cissue.add_argument("--balance", type=int, default=0, help="opening balance in fen")
    cissue.add_argument("--balance-max", type=int, default=0, help="maximum balance in fen")
    cissue.add_argument("--expires", default="", help="YYMM")
    cissue.add_argument("--out", help="CSV file for the card numbers")

    adm = commands.add_parser(
        "admin",
        help="bootstrap the admin API and card stock",
        description=admin_commands.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    adm.add_argument("--db", dest="db_url", help="database URL (CARDCORE_DB_URL)")
    adm_commands = adm.add_subparsers(dest="admin_command", required=True, parser_class=_Parser)
    atoken = adm_commands.add_parser(
        "token",
        help="the first HQ admin's token (printed once)",
        description="Make the group HQ admin NAME if missing and print a new token once.",
    )
    atoken.add_argument("--name", default="root", help="the HQ admin's user name")
    atoken.add_argument("--ttl-days", type=int, default=90, help="days the token lives")
    aissue = adm_commands.add_parser(
        "issue-cards",
        help="issue a batch of bearer or gift cards (CSV for printing)",
        description="Issue up to 100,000 bearer or gift cards of a class at a store (which "
        "needs HQ's grant), with a progress bar on stderr; --out writes the CSV for printing.",
    )
    aissue.add_argument("--class", dest="class_code", required=True, help="card class code")
    aissue.add_argument("--store", required=True, help="the issuing store")
    aissue.add_argument("--count", type=int, required=True)
    aissue.add_argument("--out", help="CSV file: card_id,card_number,class_code,expires,...")
    aissue.add_argument(
        "--full-numbers", action="store_true", help="full card numbers in the CSV (mode 0600)"
    )
    adm_commands.add_parser(
        "demo",
        help="idempotent demo organization",
        description="Two legal entities, three stores, card classes ORDINARY, VIP, BEARER and "
        "GIFT100, and each store's grants; what exists is left as it is.",
    )

    coupons = commands.add_parser("coupons", help="e-coupons", description="E-coupons.")
    coupons.add_argument("--db", dest="db_url", help="database URL (CARDCORE_DB_URL)")
    coupon_commands = coupons.add_subparsers(
        dest="coupons_command", required=True, parser_class=_Parser
    )
    cgen = coupon_commands.add_parser(
        "generate",
        help="generate a campaign's codes in bulk (CSV for printing)",
        description="Generate up to 10,000,000 fresh codes of a campaign, inserted in chunks "
        "with a progress bar on stderr; --out writes code,display as CSV (mode 0600).",
    )
    cgen.add_argument("--campaign", required=True, help="the campaign's code")
    cgen.add_argument("--count", type=int, required=True)
    cgen.add_argument("--out", help="CSV file: code,display")

    points = commands.add_parser("points", help="the points engine", description="Points.")
    points.add_argument("--db", dest="db_url", help="database URL (CARDCORE_DB_URL)")
    points_commands = points.add_subparsers(
        dest="points_command", required=True, parser_class=_Parser
    )
    pexpire = points_commands.add_parser(
        "expire",
        help="expire lots whose expiry passed; expiry notices and reminders into the outbox",
        description="Expire every points lot whose expiry passed (each program's time zone) "
        "and write into the members' outbox, per holder, program and expiry day, one "
        "points_expired notice and one points_expiring reminder for lots expiring within "
        "--remind-days days. Safe to run twice; runs the "
        "ledger writer here, so on PostgreSQL it refuses while a server owns the database.",
    )
    pexpire.add_argument(
        "--remind-days",
        type=int,
        default=limits.POINTS_REMINDER_DAYS_DEFAULT,
        help=f"days ahead of an expiry to remind (0..{limits.POINTS_REMINDER_DAYS_MAX})",
    )

    keys = commands.add_parser("keys", help="keys", description="Keys.")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    kinit = keys_commands.add_parser(
        "init",
        help="create the key-encrypting key file",
        description="Create a random key-encrypting key file (mode 0600) unless one exists. "
        "Back it up: without it no sealed terminal key can be read.",
    )
    kinit.add_argument("--kek-file", help="path (default: kek_file, else data/kek)")

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
    bp = bench_commands.add_parser(
        "pos",
        help="drive simulated terminals through a gateway",
        description=bench_pos.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bp.add_argument("--terminals", type=int, default=100)
    bp.add_argument("--seconds", type=int, default=10)
    bp.add_argument("--db", help="database of the processes started here (default temp SQLite)")
    bp.add_argument("--ledger", help="a running ledger URL: start only a gateway against it")
    bp.add_argument("--separate", action="store_true", help="gateway and ledger as two processes")
    bp.add_argument("--idle", type=int, default=0, help="extra signed-on terminals that only echo")
    bp.add_argument("--token", default="", help="internal token of the ledger at --ledger")
    bp.add_argument("--admin-token", default="", help="HQ admin token of the ledger at --ledger")
    bp.add_argument("--rate", type=int, default=0, help="offered purchases/s in all (0: flat out)")
    bp.add_argument(
        "--mix",
        choices=bench_pos.MIXES,
        default="plain",
        help="plain purchases, or realistic: by default 70%% purchases earning points, 20%% "
        "with a coupon, 10%% points redemptions (see --shares)",
    )
    bp.add_argument(
        "--shares",
        type=_shares,
        default=None,
        metavar="P,C,R",
        help="realistic: percent of purchases, coupon purchases and points redemptions "
        "(default 70,20,10)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load(args.config)
        names = ("db_url", "host", "port", "gateway_host", "gateway_port")
        overrides = {k: getattr(args, k, None) for k in names}
        if getattr(args, "ledger", None) and args.command == "gateway":
            overrides["gateway_ledger_urls"] = args.ledger
        config = config.with_overrides(overrides).check()
        logs.configure(config.log_level, config.log_format)
        if args.command not in SERVERS:
            signal.signal(signal.SIGTERM, _interrupt)
        return _dispatch(args, config)
    except admin_commands.Interrupted as exc:
        print(json.dumps(exc.answer))
        return _fail(str(exc), EXIT_INTERRUPTED)
    except (
        config_module.ConfigError,
        DatabaseUrlError,
        bench.BenchError,
        pos_commands.CommandError,
        admin_commands.AdminCommandError,
        SafError,
        WriterLockError,  # a second `cardcore ledger` or `serve` on one database
    ) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (migrate.NotMigrated, migrate.DatabaseUnavailable, migrate.WrongKek) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except DATABASE_ERRORS as exc:  # e.g. a port in use, a path under a file, a dead server
        return _fail(migrate.reason(exc), EXIT_USAGE)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, once or twice
        return EXIT_INTERRUPTED


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (`timeout`, systemd, a CI runner) stops a command as Ctrl-C does, so the same
    clean-up runs: a bulk job keeps and reports what stands, a benchmark stops the servers
    it started. The servers (SERVERS) shut down gracefully on SIGTERM themselves."""
    signal.raise_signal(signal.SIGINT)


def _dispatch(args: argparse.Namespace, config: config_module.Config) -> int:
    if args.command == "migrate":
        migrate.upgrade(config.db_url)
        print(json.dumps({"migrated": True, "revision": migrate.head_revision()}))
        return 0
    if args.command == "ledger" and args.ledger_command == "verify":
        return asyncio.run(_verify(config.db_url))
    if args.command in ("serve", "ledger"):
        from cardcore.api.server import serve  # noqa: PLC0415 - keep aiohttp off other commands

        with_demo = getattr(args, "demo", False)
        if with_demo and not config_module.is_loopback(config.gateway_host):
            raise config_module.ConfigError(
                "--demo serves a terminal whose master key is published: its gateway_host "
                f"must be loopback, not {config.gateway_host}"
            )
        asyncio.run(migrate.check_current(config.db_url))
        runtime.run(serve(config, role=args.command, with_demo=with_demo))
        return 0
    if args.command == "keys":
        print(json.dumps(pos_commands.keys_init(config, args.kek_file)))
        return 0
    if args.command == "gateway":
        runtime.run(pos_commands.run_gateway(config))
        return 0
    if args.command == "pos":
        return asyncio.run(pos_commands.run_pos(config, args))
    if args.command == "terminal":
        body = {
            "tid": args.tid,
            "mid": args.mid,
            "store": args.store,
            "legal_entity": args.legal_entity,
            "key_mode": args.key_mode,
        }
        answer = asyncio.run(
            pos_commands.host_post(config, args.url, "/internal/v1/terminals", body, "tmk")
        )
        print(json.dumps(answer))
        return 0
    if args.command == "admin":
        return asyncio.run(admin_commands.run(config, args))
    if args.command == "coupons":
        return asyncio.run(admin_commands.run_coupons(config, args))
    if args.command == "card":
        return asyncio.run(pos_commands.issue_cards(config, args))
    if args.command == "points":
        return asyncio.run(_points_expire(config, args.remind_days))
    if args.bench_command == "pos":
        options_pos = bench_pos.PosBenchOptions(
            terminals=args.terminals,
            seconds=args.seconds,
            db=args.db,
            ledger=args.ledger,
            separate=args.separate,
            idle=args.idle,
            token=args.token,
            admin_token=args.admin_token,
            rate=args.rate,
            mix=args.mix,
            shares=args.shares,
        )
        print(json.dumps(bench_pos.run(options_pos)))
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
        verifier = await store.verify(limits.VERIFY_CHUNK_BATCHES, limits.VERIFY_CHUNK_ROWS_MAX)
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


async def _points_expire(config: config_module.Config, remind_days: int) -> int:
    """`cardcore points expire`: one run of the expiry job, its totals as one JSON line."""
    from cardcore.cards.accounts import Accounts  # noqa: PLC0415 - only this command
    from cardcore.cards.directory import Directory  # noqa: PLC0415
    from cardcore.ledger.service import Ledger  # noqa: PLC0415
    from cardcore.metrics import Metrics  # noqa: PLC0415
    from cardcore.org.service import OrgService  # noqa: PLC0415
    from cardcore.points.service import PointsService  # noqa: PLC0415
    from cardcore.records import Records  # noqa: PLC0415

    if not 0 <= remind_days <= limits.POINTS_REMINDER_DAYS_MAX:
        return _fail(f"--remind-days must be 0..{limits.POINTS_REMINDER_DAYS_MAX}", EXIT_USAGE)
    await migrate.check_current(config.db_url)
    ledger = Ledger.open(config.db_url, Metrics(), batch_wait_ms_max=config.batch_wait_ms_max)
    try:
        await ledger.start()
    except WriterLockError:
        await ledger.store.engine.dispose()
        return _fail("a running cardcore server owns this database's ledger", EXIT_USAGE)
    try:
        records = Records(ledger.store.engine)
        service = PointsService(
            records, OrgService(records), ledger, Directory(ledger.store.engine), Accounts(ledger)
        )
        totals = await service.expire(service.clock_ms(), remind_days)
    finally:
        await ledger.close()
    print(json.dumps(totals, sort_keys=True))
    return 0
