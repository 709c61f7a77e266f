"""`cardcore admin ...`: bootstrap work on the configured database, in this process, as the
console principal (an HQ admin of the group; every change is audited under user "console").

    cardcore admin token [--name root] [--ttl-days N]     the first HQ admin's token, once
    cardcore admin issue-cards --class C --store S --count N [--out FILE.csv] [--full-numbers]
    cardcore admin demo                                    idempotent demo organization
    cardcore coupons generate --campaign C --count N [--out FILE.csv]   codes in bulk

`issue-cards` runs the ledger writer here: on PostgreSQL it refuses while a server owns the
database (use POST /v1/card-batches then). Its CSV holds masked numbers unless
`--full-numbers`; a file with full numbers is readable by its owner only (mode 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from cardcore import demo as demo_data
from cardcore import limits, migrate
from cardcore.cards.accounts import Accounts
from cardcore.cards.directory import Directory
from cardcore.cards.pins import Pins
from cardcore.cards.service import CardService, CardsUnavailable
from cardcore.config import Config, load_kek
from cardcore.coupons.model import display
from cardcore.coupons.service import CouponService
from cardcore.db import make_engine
from cardcore.ledger.service import Ledger
from cardcore.ledger.store import WriterLockError
from cardcore.metrics import Metrics
from cardcore.org.model import Refused, Role
from cardcore.org.service import CONSOLE, OrgService
from cardcore.records import Records
from cardcore.vault import Vault

DAY_S = 24 * 3600
TTL_DAYS_MAX = limits.TOKEN_TTL_S_MAX // DAY_S
PROGRESS_WIDTH = 30  # characters of the progress bar


class AdminCommandError(Exception):
    """A command that cannot run as asked: one line on stderr, a non-zero exit."""


class Interrupted(AdminCommandError):
    """Ctrl-C (or SIGTERM, which `cardcore` turns into it) after part of the work stands:
    what stands goes to stdout as the command's JSON line (`answer`), what to do about the
    rest to stderr, exit 130."""

    def __init__(self, message: str, answer: dict[str, Any]) -> None:
        super().__init__(message)
        self.answer = answer


INTERRUPTS = (KeyboardInterrupt, asyncio.CancelledError)  # Ctrl-C, inside asyncio.run or not


async def run(config: Config, args: Any) -> int:
    await migrate.check_current(config.db_url)
    try:
        if args.admin_command == "token":
            answer = await token(config, args.name, args.ttl_days)
        elif args.admin_command == "issue-cards":
            answer = await issue_cards(
                config,
                class_code=args.class_code,
                store=args.store,
                count=args.count,
                out=args.out,
                full_numbers=args.full_numbers,
                progress_to=sys.stderr,
            )
        else:
            answer = await demo(config)
    except Refused as exc:
        where = f" ({exc.field})" if exc.field else ""
        raise AdminCommandError(f"{exc.code}{where}: {exc.message}") from None
    except CardsUnavailable as exc:
        raise AdminCommandError(f"ledger_unavailable: {exc}") from None
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


# --- token -----------------------------------------------------------------------------------


async def token(config: Config, name: str, ttl_days: int) -> dict[str, Any]:
    """A new token of the group HQ admin `name` (made if missing), shown this once."""
    if not 1 <= ttl_days <= TTL_DAYS_MAX:
        raise AdminCommandError(f"--ttl-days is 1..{TTL_DAYS_MAX}")
    engine = make_engine(config.db_url, pool_size=1)
    try:
        minted = await OrgService(Records(engine)).bootstrap_admin(name, ttl_days * DAY_S)
    finally:
        await engine.dispose()
    return {"user": name, "token": minted["token"], "expires_at_ms": minted["expires_at_ms"]}


# --- issue-cards -----------------------------------------------------------------------------


@dataclass
class ProgressBar:
    """`phase [#####.....] done/total` redrawn in place on a terminal stream."""

    stream: TextIO
    last: tuple[str, int] = ("", -1)
    done: int = 0  # the last count drawn
    drawn: bool = False  # a bar is on the line, not ended

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.done = done
        filled = PROGRESS_WIDTH * done // max(total, 1)
        if (phase, filled) == self.last and done != total:
            return
        self.last = (phase, filled)
        bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
        self.stream.write(f"\r{phase:<9}[{bar}] {done}/{total}")
        self.drawn = done < total  # a line the next draw overwrites
        if not self.drawn:
            self.stream.write("\n")
        self.stream.flush()

    def end(self) -> None:
        """End a bar left half drawn (a run cut short), so the next line starts clean."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


@asynccontextmanager
async def card_service(config: Config, kek: bytes) -> AsyncIterator[CardService]:
    """The card service on the configured database, with its own running ledger writer."""
    await migrate.check_kek(config.db_url, kek)  # never seal with another key than its own
    ledger = Ledger.open(config.db_url, Metrics(), batch_wait_ms_max=config.batch_wait_ms_max)
    try:
        await ledger.start()
    except WriterLockError:
        await ledger.store.engine.dispose()
        raise AdminCommandError(
            "a running cardcore server owns this database's ledger: issue the batch through "
            "POST /v1/card-batches, or stop the server"
        ) from None
    try:
        records = Records(ledger.store.engine)
        vault = Vault(kek)
        directory = Directory(ledger.store.engine)
        yield CardService(
            records,
            OrgService(records),
            vault,
            ledger,
            directory,
            Accounts(ledger),
            Pins(records, vault, directory),
        )
    finally:
        await ledger.close()


async def issue_cards(
    config: Config,
    *,
    class_code: str,
    store: str,
    count: int,
    out: str | None,
    full_numbers: bool,
    progress_to: TextIO,
) -> dict[str, Any]:
    """A batch of bearer or gift cards, and its CSV for printing when `out` is given."""
    if not 1 <= count <= limits.CARD_ISSUE_BATCH_MAX:
        raise AdminCommandError(f"--count is 1..{limits.CARD_ISSUE_BATCH_MAX}")
    kek = load_kek(config)
    if kek is None:
        raise AdminCommandError("issuing cards needs the key-encrypting key (CARDCORE_KEK)")
    with contextlib.ExitStack() as files:
        handle = None if out is None else print_file(files, out)
        async with card_service(config, kek) as service:
            batch = await service.issue_batch(
                CONSOLE, class_code, store, count, progress=ProgressBar(progress_to)
            )
            answer: dict[str, Any] = {"class": class_code, "store": store, **batch}
            if handle is None:
                return answer
            # The console sees full numbers; an auditor's view of the same cards is masked.
            reader = CONSOLE if full_numbers else replace(CONSOLE, role=Role.AUDITOR)
            try:
                handle.write(await service.export(reader, batch["first_id"], batch["last_id"]))
            except INTERRUPTS:  # the cards stand: say so, or a second run issues them again
                raise Interrupted(
                    f"interrupted after the cards were issued (ids {batch['first_id']}.."
                    f"{batch['last_id']}), before {out} was written: do not issue them again; "
                    "export them with GET /v1/cards/export",
                    {**answer, "out": None, "full_numbers": full_numbers},
                ) from None
    return {**answer, "out": out, "full_numbers": full_numbers}


@contextlib.contextmanager
def private_output(path: Path, keep: Callable[[], bool] = lambda: False) -> Iterator[TextIO]:
    """A file for full card numbers or codes, opened BEFORE the work that makes them: a
    temporary file beside `path`, readable by the owner only (mode 0600), that replaces
    `path` once the block ends without an error (or with one, when `keep()` says that what
    was written stands: codes committed chunk by chunk). So a path that cannot be written
    is refused before anything is issued (a number shown once is never lost). An existing
    file is never replaced (it may hold the only copy of an earlier run's numbers): it is
    refused at the start (FileExistsError), and the file is put in place by a link that
    fails rather than replace one made meanwhile (`_commit`)."""
    if path.is_dir():  # checked now: the rename at the end would fail after the work
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
    if path.exists() or path.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists; an earlier print file is never replaced",
                              str(path))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    handle = os.fdopen(fd, "w", encoding="ascii")
    try:
        os.fchmod(fd, 0o600)
        yield handle
    except BaseException:
        if not keep():
            handle.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _commit(handle, temporary, path)
        raise
    _commit(handle, temporary, path)


def print_file(
    files: contextlib.ExitStack, out: str, keep: Callable[[], bool] = lambda: False
) -> TextIO:
    """`private_output` of `--out`, opened in `files`; refused in one line naming the option
    when the path cannot be written (a folder, a path under a file, no permission)."""
    try:
        return files.enter_context(private_output(Path(out), keep))
    except OSError as exc:
        raise AdminCommandError(f"--out {out}: {exc.strerror}") from None


def _commit(handle: TextIO, temporary: str, path: Path) -> None:
    """The written file in place under `path`, never over a file made there since the
    start: then it stays under its temporary name, which the error names."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise AdminCommandError(
            f"{path} was made by someone else meanwhile; this run's file is {temporary}"
        ) from None
    except OSError as exc:  # a file system without hard links, say: the numbers are kept
        raise AdminCommandError(
            f"{path} could not be put in place ({exc.strerror}); this run's file is {temporary}"
        ) from None
    os.unlink(temporary)


# --- coupons generate --------------------------------------------------------------------------


async def run_coupons(config: Config, args: Any) -> int:
    """`cardcore coupons generate --campaign C --count N [--out FILE.csv]`."""
    await migrate.check_current(config.db_url)
    try:
        answer = await generate_coupons(
            config, campaign=args.campaign, count=args.count, out=args.out,
            progress_to=sys.stderr,
        )  # fmt: skip
    except Refused as exc:
        where = f" ({exc.field})" if exc.field else ""
        raise AdminCommandError(f"{exc.code}{where}: {exc.message}") from None
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


async def generate_coupons(
    config: Config, *, campaign: str, count: int, out: str | None, progress_to: TextIO
) -> dict[str, Any]:
    """`count` fresh codes of `campaign` as the console (audited), written chunk by chunk
    (limits.COUPON_INSERT_CHUNK_MAX a transaction), a progress bar on `progress_to`, and the
    codes streamed to the CSV `out` (code,display; mode 0600: a code is a bearer value).
    Needs no ledger writer: it runs beside a server."""
    if not 1 <= count <= limits.COUPON_GENERATE_CLI_MAX:
        raise AdminCommandError(f"--count is 1..{limits.COUPON_GENERATE_CLI_MAX}")
    # Generating seals nothing: without the KEK a throwaway key stands in for the vault.
    vault = Vault(load_kek(config) or secrets.token_bytes(32))
    engine = make_engine(config.db_url, pool_size=2)
    try:
        written = [0]  # codes in the file: they stand (committed) even if a later chunk fails
        with contextlib.ExitStack() as files:
            handle = None if out is None else print_file(files, out, keep=lambda: written[0] > 0)
            if handle is not None:
                handle.write("code,display\n")
            sink = None if handle is None else _csv_sink(handle, written)
            records = Records(engine)
            service = CouponService(records, OrgService(records), vault)
            batch: list[int] = []
            bar = ProgressBar(progress_to)
            asked = [False]  # Ctrl-C or SIGTERM asked the run to stop

            def progress(phase: str, done: int, total: int) -> None:
                bar(phase, done, total)
                if asked[0] and done < total:
                    raise _Stop

            try:
                with _stop_between_chunks(asked):
                    done = await service.generate(
                        CONSOLE, campaign, count, sink=sink, progress=progress,
                        opened=batch.append,
                    )  # fmt: skip
            except (_Stop, *INTERRUPTS):
                bar.end()
                if not batch:  # nothing reserved, nothing written: a plain Ctrl-C (130)
                    raise KeyboardInterrupt from None
                made = bar.done  # committed chunks, each in the file (kept) when --out
                raise Interrupted(
                    f"interrupted: {made} of {count} codes of campaign {campaign} stand in "
                    f"batch {batch[0]}{f' and in {out}' if out else ''} (the batch's `done` "
                    "counts any chunk committed as the run stopped); the batch stays running "
                    f"with the campaign's budget reserved for all {count}; a new run is a new "
                    "batch (docs/coupons.md)",
                    {
                        "campaign": campaign,
                        "batch": batch[0],
                        "count": count,
                        "done": made,
                        "source": "generated",
                        **({} if out is None else {"out": out}),
                    },
                ) from None
    finally:
        await engine.dispose()
    return {**done, **({} if out is None else {"out": out})}


class _Stop(Exception):
    """Raised between two chunks of a run that Ctrl-C (or SIGTERM) asked to stop."""


@contextlib.contextmanager
def _stop_between_chunks(asked: list[bool]) -> Iterator[None]:
    """While a chunked run goes on, Ctrl-C (and SIGTERM, `cli._interrupt`) sets `asked[0]`:
    the run's progress callback then stops it at the end of the chunk it is writing, with no
    statement in flight. Cancelling the task instead did not do: asyncpg does not always give
    way to a cancellation in the middle of a statement, and a run went on for minutes. A
    second Ctrl-C cancels the run where it is."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal() -> None:
        if asked[0] and task is not None:
            task.cancel()
        asked[0] = True

    loop.add_signal_handler(signal.SIGINT, on_signal)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _csv_sink(handle: TextIO, written: list[int]) -> Callable[[list[str]], None]:
    def write(codes: list[str]) -> None:
        handle.writelines(f"{code},{display(code)}\n" for code in codes)
        written[0] += len(codes)

    return write


# --- demo ------------------------------------------------------------------------------------


async def demo(config: Config) -> dict[str, Any]:
    """The demo organization (`demo.load_organization`, which `serve --demo` makes too):
    two legal entities, three stores, four card classes and each store's grants; what
    exists already is left as it is."""
    ledger = Ledger.open(config.db_url, Metrics())  # never started: nothing here posts
    records = Records(ledger.store.engine)
    org = OrgService(records)
    # Classes and grants seal nothing: a throwaway key keeps the KEK optional here.
    vault = Vault(secrets.token_bytes(32))
    directory = Directory(ledger.store.engine)
    cards = CardService(
        records, org, vault, ledger, directory, Accounts(ledger), Pins(records, vault, directory)
    )
    try:
        made = await demo_data.load_organization(org, cards)
    finally:
        await ledger.store.engine.dispose()
    return {"made": made, "classes": [c["code"] for c in demo_data.DEMO_CLASSES],
            "stores": [s[0] for s in demo_data.DEMO_STORES]}  # fmt: skip
