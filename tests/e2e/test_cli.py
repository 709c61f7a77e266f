"""The `cardcore` command as real processes on loopback: help, refusals, serve with demo data,
the internal token, and the benchmark. Every process is bounded in time and ended in finally.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from cardcore import migrate
from cardcore.ledger.service import Ledger
from cardcore.metrics import Metrics
from tests.helpers import cardcore_env, free_port, run_cardcore

PYTHON_M_CARDCORE = (sys.executable, "-m", "cardcore")
CONSOLE_SCRIPT = Path(sys.executable).parent / "cardcore"
TOKEN = "e2e-token-0123456789abcdef"  # noqa: S105 - a test server's token
STOP_S_MAX = 15
DEMO_CARD = "6288880000000013"  # the demo's first card (cardcore.demo.DEMO_CARDS)
START_S_MAX = 30

Done = subprocess.CompletedProcess[str]


@dataclass(frozen=True, slots=True)
class Command:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Path


# The bound on a batch of commands started together: each is a Python process that compiles
# cardcore (1.3-1.8 s of CPU), about 60 at once on two cores shared with the other test
# workers; 60 s was exceeded on a slow, loaded day with nothing wrong.
TOGETHER_S = 180


def _run_together(commands: Mapping[str, Command], timeout_s: float) -> dict[str, Done]:
    """Start every command at once, wait for all within `timeout_s`, kill what is left."""
    started: dict[str, subprocess.Popen[str]] = {}
    done: dict[str, Done] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for name, c in commands.items():
            started[name] = subprocess.Popen(
                list(c.argv),
                cwd=c.cwd,
                env=dict(c.env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        for name, process in started.items():
            try:
                out, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
                err += f"\n[test: killed after {timeout_s} s]"
            done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return done


def _one_line_error(done: Done) -> str:
    """The error line, after checking it is the only thing on stderr besides argparse's usage
    lines, and that nothing went to stdout."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("cardcore: error:")]
    assert len(errors) == 1, done.stderr
    usage = [line for line in lines if line not in errors]
    assert all(line.startswith(("usage: ", " ")) for line in usage), done.stderr
    assert done.stdout == "", done.stdout
    return errors[0]


# --- help ----------------------------------------------------------------------------------

HELP = {
    "cardcore": (),
    "serve": ("serve",),
    "ledger": ("ledger",),
    "ledger verify": ("ledger", "verify"),
    "migrate": ("migrate",),
    "bench": ("bench",),
    "bench ledger": ("bench", "ledger"),
}


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Done]:
    cwd = tmp_path_factory.mktemp("help")
    env = cardcore_env()
    commands = {
        name: Command([*PYTHON_M_CARDCORE, *args, "--help"], env, cwd)
        for name, args in HELP.items()
    }
    if CONSOLE_SCRIPT.exists():  # `cardcore --help` through the installed command itself
        commands["cardcore"] = Command([str(CONSOLE_SCRIPT), "--help"], env, cwd)
    return _run_together(commands, timeout_s=TOGETHER_S)


@pytest.mark.parametrize("name", HELP)
def test_help_prints_usage_and_exits_0(helps: dict[str, Done], name: str) -> None:
    done = helps[name]
    assert done.returncode == 0, done.stderr
    prog = " ".join(("cardcore", *HELP[name]))
    assert done.stdout.startswith(f"usage: {prog} "), done.stdout
    assert "-h, --help" in done.stdout
    assert done.stderr == ""


# --- refusals ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    args: tuple[str, ...]
    env: Mapping[str, str]
    says: str  # a fragment of the error line
    exit_code: int | None = 2  # None: any non-zero code


def _refusals(tmp: Path, port: str = "8080") -> dict[str, Refusal]:
    """The cases, by name; `tmp` holds unknown-key.toml and a-file (see `refused`)."""
    db = f"sqlite:///{tmp / 'refusals.db'}"
    bad_toml = tmp / "unknown-key.toml"
    blocker = tmp / "a-file"
    everywhere = {"CARDCORE_HOST": "0.0.0.0"}  # refused before it listens
    return {
        "unknown command": Refusal(("frobnicate",), {}, "invalid choice: 'frobnicate'"),
        "port not a number": Refusal(("serve", "--port", "abc"), {}, "invalid int value: 'abc'"),
        "unsupported database url": Refusal(
            ("serve", "--port", port), {"CARDCORE_DB_URL": "mysql://x"}, "unsupported database"
        ),
        "database url whose port does not parse, password kept out": Refusal(
            ("migrate", "--db", "postgresql://u:s3cretpw@127.0.0.1:abc/db"),
            {},
            "not a database URL: 'postgresql://u:***@127.0.0.1:abc/db'",
        ),
        "database port out of range": Refusal(
            ("migrate", "--db", "postgresql://u@127.0.0.1:99999/x"),
            {},
            "the database port is 1..65535, not 99999",
        ),
        "database url with a parameter the driver does not take": Refusal(
            ("migrate", "--db", "postgresql://u@127.0.0.1/x?options=-c%20y"),
            {},
            "the database URL parameter 'options' is not one of",
        ),
        "verify of a database url whose port does not parse": Refusal(
            ("ledger", "verify", "--db", "postgresql://u:secret@127.0.0.1:abc/db"),
            {},
            "not a database URL: 'postgresql://u:***@127.0.0.1:abc/db'",
        ),
        "in-memory sqlite database": Refusal(
            ("migrate", "--db", "sqlite://"), {}, "SQLite needs a file"
        ),
        "demo with a public gateway": Refusal(
            ("serve", "--db", db, "--port", port, "--demo"),
            {"CARDCORE_GATEWAY_HOST": "0.0.0.0"},
            "--demo serves a terminal whose master key is published",
        ),
        "internal token with a line break": Refusal(
            ("serve", "--db", db, "--port", port),
            {"CARDCORE_INTERNAL_TOKEN": "abcdefghijklmnop\r\nX: 1"},
            "printable ASCII",
        ),
        "internal token of spaces": Refusal(
            ("serve", "--db", db, "--port", port),
            {**everywhere, "CARDCORE_INTERNAL_TOKEN": " " * 16},
            "printable ASCII",
        ),
        "gateway tls files that do not exist": Refusal(
            ("gateway",),
            {
                "CARDCORE_GATEWAY_TLS_CERT": str(tmp / "no-cert.pem"),
                "CARDCORE_GATEWAY_TLS_KEY": str(tmp / "no-key.pem"),
                "CARDCORE_KEK": "5a" * 32,
                "CARDCORE_GATEWAY_LEDGER_URLS": "http://127.0.0.1:1",
            },
            "no-cert.pem and gateway_tls_key",
        ),
        "gateway ledger that is not a url": Refusal(
            ("gateway",), {"CARDCORE_GATEWAY_LEDGER_URLS": "notaurl"}, "not an http(s) URL"
        ),
        "empty reversal store file": Refusal(
            ("gateway",), {"CARDCORE_GATEWAY_SAF_FILE": " "}, "gateway_saf_file must name"
        ),
        "non-loopback host without token": Refusal(
            ("serve", "--db", db, "--port", port), everywhere, "CARDCORE_INTERNAL_TOKEN"
        ),
        "config file with an unknown key": Refusal(
            ("--config", str(bad_toml), "serve", "--port", port), {}, "unknown setting 'colour'"
        ),
        "unknown log level": Refusal(
            ("migrate", "--db", db), {"CARDCORE_LOG_LEVEL": "LOUD"}, "log_level"
        ),
        "bench with a writer setting for a ledger it does not start": Refusal(
            ("bench", "ledger", "--url", "http://127.0.0.1:1", "--batch-size-max", "5"),
            {},
            "--batch-size-max is for the ledger started here",
        ),
        "bench with a batch size of zero (before it starts anything)": Refusal(
            ("bench", "ledger", "--batch-size-max", "0"), {}, "--batch-size-max must be 1.."
        ),
        "bench with zero clients": Refusal(
            ("bench", "ledger", "--clients", "0"), {}, "--clients must be 1.."
        ),
        "bench pos shares not adding up to 100": Refusal(
            ("bench", "pos", "--mix", "realistic", "--shares", "50,20,10"),
            {},
            "--shares must add up to 100, not 80",
        ),
        "bench pos shares that are not numbers": Refusal(
            ("bench", "pos", "--shares", "a,b,c"), {}, "three whole percentages"
        ),
        "bench pos shares without the realistic mix": Refusal(
            ("bench", "pos", "--shares", "0,100,0"), {}, "--shares is for --mix realistic"
        ),
        # `cardcore pos` checks its options before it signs on (no gateway listens here).
        "pos action without its card": Refusal(
            ("pos", "points-earn", "--amount", "100"), {}, "points-earn needs --card"
        ),
        "pos amount that is not a number": Refusal(
            ("pos", "points-return", "--card", DEMO_CARD, "--amount", "ten"),
            {},
            "argument --amount: invalid int value: 'ten'",
        ),
        "pos amount below zero": Refusal(
            ("pos", "coupon-query", "--coupon", "ABCD", "--amount", "-5"),
            {},
            "--amount must be 0..999999999999",
        ),
        "pos card number that is not digits": Refusal(
            ("pos", "points-earn", "--card", "6288-8800-0000-0013", "--amount", "100"),
            {},
            "--card must be 12 to 19 digits",
        ),
        "pos manager authorization without a pin": Refusal(
            ("pos", "manager-auth", "--card", DEMO_CARD, "--amount", "900", "--reason", "x"),
            {},
            "manager-auth needs --pin",
        ),
        "pos points that are zero": Refusal(
            ("pos", "points-redeem", "--card", DEMO_CARD, "--points", "0"),
            {},
            "--points must be 1..1000000000",
        ),
        "pos coupon redeem without a coupon": Refusal(
            ("pos", "coupon-redeem", "--amount", "900"), {}, "coupon-redeem needs --coupon"
        ),
        "pos stan that is not digits": Refusal(
            ("pos", "coupon-reverse", "--original-stan", "12a"),
            {},
            "--original-stan must be 1 to 6 digits",
        ),
        "pos reference number of the wrong length": Refusal(
            ("pos", "points-return", "--card", DEMO_CARD, "--amount", "100", "--rrn", "123"),
            {},
            "--rrn must be 12 letters or digits",
        ),
        "pos reverse before any request": Refusal(
            ("pos", "reverse"), {}, "reverse: no financial request of this batch"
        ),
        "unreachable postgresql": Refusal(
            ("serve", "--db", "postgresql://cardcore@127.0.0.1:1/cardcore", "--port", port),
            {},
            "",
            exit_code=None,
        ),
        "keys init over a folder": Refusal(
            ("keys", "init", "--kek-file", str(tmp)), {}, "is not a file"
        ),
        "keys init over a file that holds no key": Refusal(
            ("keys", "init", "--kek-file", str(blocker)), {}, "must hold 64 hexadecimal digits"
        ),
        "pos state file of the wrong shape": Refusal(
            ("pos", "echo", "--state", str(tmp / "bad-state.json"), "--gateway", "127.0.0.1:1"),
            {},
            "is damaged: stan is not six digits",
        ),
        "pos state file under a file (before anything is sent)": Refusal(
            (
                "pos",
                "purchase",
                "--card",
                DEMO_CARD,
                "--amount",
                "100",
                "--state",
                str(blocker / "pos.json"),
                "--gateway",
                "127.0.0.1:1",
            ),
            {},
            "--state",
        ),
        "pos state file whose owed reversal is not a 0400": Refusal(
            ("pos", "echo", "--state", str(tmp / "bad-reversal.json"), "--gateway", "127.0.0.1:1"),
            {},
            "is damaged: a kept request is not a 0400",
        ),
        "pos coupon text longer than F48 carries (before sign-on)": Refusal(
            ("pos", "coupon-query", "--coupon", "A" * 400, "--amount", "100"),
            {},
            "--coupon is 1 to 317 characters",
        ),
        "pos merchant id of the wrong length (before sign-on)": Refusal(
            ("pos", "echo", "--mid", "M1"), {}, "--mid must be [A-Za-z0-9]{15}"
        ),
        "pos gateway port out of range": Refusal(
            ("pos", "echo", "--gateway", "127.0.0.1:99999"), {}, "the port 1..65535"
        ),
        "migrate to a path under a file": Refusal(
            ("migrate", "--db", f"sqlite:///{blocker / 'x.db'}"), {}, "", exit_code=None
        ),
    }


# `cardcore serve` before `cardcore migrate`: an empty SQLite file, and the default database
# (./data/cardcore.db) in a directory where nothing was ever run.
UNMIGRATED = ("empty sqlite file", "default database in a new directory")


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Done]:
    tmp = tmp_path_factory.mktemp("refusals")
    (tmp / "unknown-key.toml").write_text('db_url = "sqlite:///x.db"\ncolour = "red"\n')
    (tmp / "a-file").write_text("not a directory\n")
    (tmp / "bad-state.json").write_text('{"stan": 5, "batch": "000001"}')
    (tmp / "bad-reversal.json").write_text(
        '{"stan": "000001", "batch": "000001", "pending_reversal": "x"}'
    )
    port = str(free_port())  # nothing should listen on it
    commands = {
        name: Command([*PYTHON_M_CARDCORE, *r.args], cardcore_env(**r.env), tmp)
        for name, r in _refusals(tmp, port).items()
    }
    fresh = tmp_path_factory.mktemp("fresh")
    empty = tmp / "empty.db"
    empty.touch()
    commands[UNMIGRATED[0]] = Command(
        [*PYTHON_M_CARDCORE, "serve", "--db", f"sqlite:///{empty}", "--port", port],
        cardcore_env(),
        tmp,
    )
    commands[UNMIGRATED[1]] = Command(
        [*PYTHON_M_CARDCORE, "serve", "--port", port], cardcore_env(), fresh
    )
    return _run_together(commands, timeout_s=TOGETHER_S)


@pytest.mark.parametrize("name", list(_refusals(Path())))
def test_bad_usage_gives_one_error_line_and_a_non_zero_exit(
    refused: dict[str, Done], name: str
) -> None:
    expected = _refusals(Path())[name]
    done = refused[name]
    line = _one_line_error(done)
    assert expected.says in line, line
    if expected.exit_code is None:
        assert done.returncode != 0, line
    else:
        assert done.returncode == expected.exit_code, line


@pytest.mark.parametrize("name", UNMIGRATED)
def test_serve_refuses_an_unmigrated_database_and_says_to_migrate(
    refused: dict[str, Done], name: str
) -> None:
    done = refused[name]
    line = _one_line_error(done)
    assert "run `cardcore migrate`" in line, line
    assert done.returncode != 0


# --- serving -------------------------------------------------------------------------------


class Server:
    """`cardcore serve ...` in the background; `ready` is its "listening" line."""

    def __init__(self, args: Sequence[str], cwd: Path, env: Mapping[str, str]) -> None:
        self.log = cwd / f"server-{time.monotonic_ns()}.log"
        self._stderr = self.log.open("w")
        self.process = subprocess.Popen(
            [*PYTHON_M_CARDCORE, *args],
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def __enter__(self) -> Server:
        try:
            line = self._lines.get(timeout=START_S_MAX)
            self.ready = json.loads(line)
        except queue.Empty:
            self.kill()
            pytest.fail(f"no listening line within {START_S_MAX} s: {self.log.read_text()}")
        except BaseException:
            self.kill()
            raise
        return self

    def lines_until(self, prefix: str, timeout_s: float = START_S_MAX) -> list[str]:
        """The stdout lines after the listening line, up to the first that starts with
        `prefix` (the demo prints its scripted POS session there), or a failure."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return seen
        pytest.fail(f"no line {prefix!r} within {timeout_s} s: {seen} {self.log.read_text()}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def stop(self) -> int:
        """SIGTERM; the exit code, or a failure if it does not end within STOP_S_MAX."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_S_MAX)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {STOP_S_MAX} s after SIGTERM: {self.log.read_text()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_S_MAX)
        self._stderr.close()

    @property
    def stderr(self) -> str:
        return self.log.read_text()


def _http(method: str, url: str, body: object = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _demo_state(url: str, ids: Mapping[str, int]) -> tuple[int, dict[str, Any]]:
    status, ready = _http("GET", f"{url}/readyz")
    assert status == 200, ready
    accounts = {}
    for name, account_id in ids.items():
        status, account = _http("GET", f"{url}/internal/v1/accounts/{account_id}")
        assert status == 200, account
        accounts[name] = account
    return ready["seq"], accounts


def test_migrate_then_serve_demo_answers_stops_on_sigterm_and_reloads_without_duplicates(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    done = run_cardcore("migrate", "--db", db, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["migrated"] is True

    port = free_port()
    args = ["serve", "--demo", "--db", db, "--port", str(port)]
    with Server(args, tmp_path, cardcore_env()) as first:
        assert first.ready["event"] == "listening"
        assert first.ready["url"] == f"http://127.0.0.1:{port}"
        ids = first.ready["demo_accounts"]
        seq, accounts = _demo_state(first.ready["url"], ids)
        card = accounts["card_1_stored_value"]
        assert card["credits_posted"] - card["debits_posted"] == 50_000
        assert card["flags"]["no_overdraft"] is True
        assert accounts["card_1_points"]["credits_posted"] == 1_200
        first.lines_until("POS DEMO0001 settlement")  # the scripted session ended
        assert first.stop() == 0, first.stderr
        assert "Traceback" not in first.stderr

    port = free_port()
    args = ["serve", "--demo", "--db", db, "--port", str(port)]
    with Server(args, tmp_path, cardcore_env()) as second:
        assert second.ready["demo_accounts"] == ids
        assert second.ready["demo_pos"] == first.ready["demo_pos"]
        # The demo's accounts are not made twice; only the scripted POS session adds
        # transfers: on the demo terminal's cards and its store's sales account.
        second.lines_until("POS DEMO0001 settlement")
        later_seq, later_accounts = _demo_state(second.ready["url"], ids)
        sales = "store_a_sales"
        assert {k: v for k, v in later_accounts.items() if k != sales} == {
            k: v for k, v in accounts.items() if k != sales
        }
        assert later_accounts[sales]["version"] > accounts[sales]["version"]
        assert later_seq > seq
        assert second.stop() == 0, second.stderr


def test_internal_token_guards_everything_but_health(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'token.db'}"
    migrate.upgrade(db)  # in this process: `cardcore migrate` has its own test above
    env = cardcore_env(CARDCORE_HOST="127.0.0.1", CARDCORE_INTERNAL_TOKEN=TOKEN)
    port = free_port()
    with Server(["serve", "--db", db, "--port", str(port)], tmp_path, env) as server:
        url = server.ready["url"]
        op = {"op": "create_asset", "code": "CNY", "kind": "currency", "scale": 2, "name": "RMB"}
        body = {"client": "e2e", "ops": [op]}
        for token in (None, "wrong-token-0123456789", TOKEN.upper()):
            status, refused = _http("POST", f"{url}/internal/v1/ops", body, token)
            assert status == 401, refused
            assert refused["error"]["code"] == "unauthorized"
        status, _ = _http("GET", f"{url}/internal/v1/accounts/1")
        assert status == 401

        status, accepted = _http("POST", f"{url}/internal/v1/ops", body, TOKEN)
        assert status == 200, accepted
        assert accepted["results"][0]["status"] == "ok"
        for path in ("/healthz", "/readyz"):
            status, health = _http("GET", f"{url}{path}")
            assert status == 200, (path, health)
        assert server.stop() == 0, server.stderr


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_second_writer_on_one_database_is_refused_in_one_line(
    tmp_path: Path, db_url: str
) -> None:
    """One writer per database (the advisory lock): a second `cardcore ledger` on it ended
    in a WriterLockError traceback (a crash review); it is one line and exit 2."""
    holder = Ledger.open(db_url, Metrics())
    await holder.start()
    try:
        done = await asyncio.to_thread(
            run_cardcore, "ledger", "--db", db_url, "--port", str(free_port()),
            cwd=tmp_path, env=cardcore_env(),
        )  # fmt: skip
    finally:
        await holder.close()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("cardcore: error:")]
    assert errors == ["cardcore: error: another cardcore ledger writer owns this database"]


# --- benchmark -----------------------------------------------------------------------------


def test_a_scripted_pos_session_that_stops_half_way_exits_1(tmp_path: Path) -> None:
    """`cardcore pos script` said "session stopped" and exited 0 all the same."""
    done = run_cardcore("pos", "script", "--gateway", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "session stopped" in done.stdout and "Traceback" not in done.stderr


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_a_benchmark_stopped_by_sigterm_stops_the_server_it_started(tmp_path: Path) -> None:
    """SIGTERM (a `timeout`, a CI runner) stops `cardcore bench` as Ctrl-C does, so the
    ledger it started stops too. Before, the child kept running, orphaned, holding the
    database's writer lock, with its temporary folder left behind."""
    bench = subprocess.Popen(
        [*PYTHON_M_CARDCORE, "bench", "ledger", "--seconds", "60", "--clients", "2",
         "--accounts", "20"],
        cwd=tmp_path, env=cardcore_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        children: list[int] = []
        while not children and time.monotonic() < deadline:
            time.sleep(0.2)
            children = _children(bench.pid)
        assert children, "the benchmark started no server"
        time.sleep(3)  # the server is listening and the clients are at work
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert bench.returncode == 130, err
    assert "Traceback" not in err
    assert not any(Path(f"/proc/{child}").exists() for child in children)


def test_bench_ledger_prints_one_json_line_without_errors(tmp_path: Path) -> None:
    args = ["--seconds", "2", "--clients", "4", "--accounts", "50", "--ops-per-request", "4"]
    # Its own session: the ledger process the benchmark starts goes too if we must kill it.
    bench = subprocess.Popen(
        [*PYTHON_M_CARDCORE, "bench", "ledger", *args],
        cwd=tmp_path,
        env=cardcore_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = bench.communicate(timeout=90)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert bench.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out
    result = json.loads(lines[0])
    assert {"ops_per_s", "p50_ms", "p99_ms", "errors"} <= result.keys()
    assert result["errors"] == 0
    assert result["ops_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    # The ledger it started spent some CPU per operation (ticks are 10 ms: at least one).
    assert 0 < result["server_cpu_ms_per_op"] < 1000
    assert 0 < result["load_cpu_ms_per_op"] < 1000


def test_bench_pos_sets_up_through_the_admin_api_and_buys_without_errors(
    tmp_path: Path,
) -> None:
    args = ["--seconds", "2", "--terminals", "4", "--rate", "40"]  # under 20/s a terminal
    result = _bench_pos(tmp_path, args)
    assert result["bench"] == "pos" and result["errors"] == 0, result
    assert result["declines"] == {}, result
    assert result["approved"] > 0 and result["cross_entity_terminals"] == 2, result
    assert result["server_cpu_ms_per_tx"] > 0, result  # the serve process, read from /proc
    assert result["load_cpu_ms_per_tx"] > 0, result  # the simulated terminals


def test_bench_pos_counts_each_decline_by_its_response_code(tmp_path: Path) -> None:
    """One terminal offered 60 purchases a second against a gateway that lets a terminal
    send 2 (`gateway_terminal_rate_per_s`, a burst of as many): the excess is answered 91,
    and the figures say so. (At the default 20 a second, a loaded machine's round trips
    can keep one terminal under the limit.)"""
    args = ["--seconds", "2", "--terminals", "1", "--rate", "60"]
    result = _bench_pos(tmp_path, args, CARDCORE_GATEWAY_TERMINAL_RATE_PER_S="2")
    assert result["approved"] > 0, result
    assert set(result["declines"]) == {"91"}, result
    assert result["declines"]["91"] == result["errors"] > 0, result


def test_bench_pos_realistic_mix_earns_redeems_points_and_uses_coupons_without_errors(
    tmp_path: Path,
) -> None:
    args = ["--seconds", "2", "--terminals", "4", "--rate", "40", "--mix", "realistic"]
    result = _bench_pos(tmp_path, args)
    assert result["mix"] == "realistic" and result["errors"] == 0, result
    kinds = result["by_kind"]
    assert set(kinds) == {"purchase", "coupon_purchase", "points_redeem"}, result
    assert all(k["approved"] > 0 for k in kinds.values()), result
    assert result["messages_per_s"] > result["tx_per_s"] > 0, result  # a coupon: 2 messages
    assert result["server_cpu_ms_per_tx"] > 0, result
    assert result["load_cpu_ms_per_tx"] > 0, result


def test_bench_pos_shares_measure_one_kind_alone(tmp_path: Path) -> None:
    args = ["--seconds", "2", "--terminals", "2", "--rate", "10", "--mix", "realistic",
            "--shares", "0,100,0"]  # fmt: skip
    result = _bench_pos(tmp_path, args)
    assert result["shares_pct"] == [0, 100, 0] and result["errors"] == 0, result
    assert set(result["by_kind"]) == {"coupon_purchase"}, result
    assert result["messages_per_s"] > result["tx_per_s"] > 0, result


def _bench_pos(tmp_path: Path, args: list[str], **settings: str) -> dict[str, Any]:
    """`cardcore bench pos ARGS` to completion (bounded), its processes configured with
    `settings` (CARDCORE_* variables): its one JSON line."""
    bench = subprocess.Popen(
        [*PYTHON_M_CARDCORE, "bench", "pos", *args],
        cwd=tmp_path,
        env=cardcore_env(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert bench.returncode == 0, err
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result
