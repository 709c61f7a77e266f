"""Slow and idle HTTP clients on real sockets against `cardcore serve` (and the gateway's
metrics listener): each is closed, or answered 408, within its bound while another client is
served. The bounds are set small in the server process (a few seconds for the whole module).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import cardcore_env, free_port

TOKEN = "e2e-token-0123456789abcdef"  # noqa: S105 - a test server's token
BOUNDS = {  # cardcore.limits in the server process
    "HTTP_HEADERS_READ_S": 1,
    "HTTP_BODY_READ_S": 1,
    "HTTP_BODY_LINGER_S": 1,
    "HTTP_KEEPALIVE_IDLE_S": 4,  # well past the head bound: an idle connection is not a head
    "HTTP_CONNECTIONS_MAX": 8,
    "HTTP_WATCHDOG_MS": 100,
}
SLACK_S = 1.0  # the watchdog's period, a loaded machine's scheduling
START_S_MAX = 30


def _launcher(*args: str) -> list[str]:
    """`python -m cardcore ARGS` with `BOUNDS` set first."""
    code = (
        "import sys; from cardcore import limits, cli\n"
        f"for k, v in {BOUNDS!r}.items(): setattr(limits, k, v)\n"
        f"sys.exit(cli.main({list(args)!r}))"
    )
    return [sys.executable, "-c", code]


@contextlib.contextmanager
def _running(argv: list[str], cwd: Path, env: dict[str, str]) -> Iterator[dict[str, object]]:
    """The process, until its "listening" line; killed afterwards."""
    log = (cwd / "server.log").open("w")
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the server writes it, or exits
        if not line:
            pytest.fail(f"no listening line: {(cwd / 'server.log').read_text()}")
        yield json.loads(line)
    finally:
        process.kill()
        process.wait(timeout=START_S_MAX)
        log.close()


@pytest.fixture(scope="module")
def port(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`cardcore serve` (ledger only, no key-encrypting key) on a free loopback port."""
    cwd = tmp_path_factory.mktemp("slow")
    db = cwd / "ledger.db"
    shutil.copyfile(sqlite_template, db)
    port = free_port()
    argv = _launcher("serve", "--db", f"sqlite:///{db}", "--port", str(port))
    with _running(argv, cwd, cardcore_env(CARDCORE_INTERNAL_TOKEN=TOKEN)):
        yield port


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _closed_after(sock: socket.socket) -> tuple[float, bytes]:
    """Seconds until the server closes `sock`, and what it wrote before."""
    began, got = time.monotonic(), b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            got += chunk
    return time.monotonic() - began, got


def _healthz(port: int) -> bytes:
    """Another client's request, on its own connection: its answer's status line."""
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return _closed_after(sock)[1].split(b"\r\n", 1)[0]


def _trickle(sock: socket.socket, data: bytes, until_s: float, port: int) -> None:
    """`data` a byte every 0.2 s while the server takes it, for at most `until_s`; another
    client is served meanwhile."""
    deadline = time.monotonic() + until_s
    for i, byte in enumerate(data):
        if time.monotonic() > deadline:
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        if i == 2:
            assert _healthz(port) == b"HTTP/1.1 200 OK"
        time.sleep(0.2)


def test_a_connection_that_sends_nothing_is_closed_after_the_head_deadline(port: int) -> None:
    with _connect(port) as idle:
        assert _healthz(port) == b"HTTP/1.1 200 OK"
        seconds, got = _closed_after(idle)
    assert got == b""
    assert seconds <= BOUNDS["HTTP_HEADERS_READ_S"] + SLACK_S


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_head_deadline(port: int) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with _connect(port) as slow:
        began = time.monotonic()
        _trickle(slow, head, BOUNDS["HTTP_HEADERS_READ_S"] + 3 * SLACK_S, port)
        _, got = _closed_after(slow)
        seconds = time.monotonic() - began
    assert got == b""
    assert seconds <= BOUNDS["HTTP_HEADERS_READ_S"] + 3 * SLACK_S


def test_a_body_sent_slowly_is_answered_408_within_the_body_deadline(port: int) -> None:
    head = (
        b"POST /internal/v1/ops HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with _connect(port) as slow:
        slow.sendall(head)
        began = time.monotonic()
        _trickle(slow, b"[" + b" " * 999, BOUNDS["HTTP_BODY_READ_S"] + SLACK_S, port)
        _, got = _closed_after(slow)
        seconds = time.monotonic() - began
    status, _, rest = got.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout", got
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    # answered at the deadline; closed once the rest of the body lingered
    limit = BOUNDS["HTTP_BODY_READ_S"] + BOUNDS["HTTP_BODY_LINGER_S"] + 2 * SLACK_S
    assert seconds <= limit


def test_idle_connections_past_the_cap_are_closed_at_once_and_the_rest_in_time(
    port: int,
) -> None:
    cap = BOUNDS["HTTP_CONNECTIONS_MAX"]
    held = [_connect(port) for _ in range(cap)]
    time.sleep(0.2)  # all accepted
    try:
        with _connect(port) as extra:
            seconds, got = _closed_after(extra)
        assert got == b""
        assert seconds < SLACK_S  # at once
        time.sleep(BOUNDS["HTTP_HEADERS_READ_S"] + SLACK_S)
        assert [_closed_after(sock)[1] for sock in held] == [b""] * cap  # closed meanwhile
        assert _healthz(port) == b"HTTP/1.1 200 OK"
    finally:
        for sock in held:
            sock.close()


def test_a_keep_alive_connection_idles_at_most_the_keep_alive_bound(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        seconds, got = _closed_after(sock)
    assert got == b""
    keepalive = BOUNDS["HTTP_KEEPALIVE_IDLE_S"]
    assert keepalive - SLACK_S <= seconds <= keepalive + SLACK_S  # not cut at the head bound
