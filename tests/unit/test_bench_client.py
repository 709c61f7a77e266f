"""The benchmark's own HTTP client (`cardcore.bench.HttpClient`) against a loopback server
that answers as told: keep-alive, closing, malformed and cut-short answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from cardcore import limits
from cardcore.bench import BenchError, BenchOptions, HttpClient, _client, _response_head, _Tally

Answer = Callable[[bytes], bytes | None]  # request body -> raw answer (None: hang up)
Serve = Callable[[Answer], Awaitable[tuple["_Server", str]]]


class _Server:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                raw = self.answer(body)
                if raw is None:
                    break
                writer.write(raw)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> tuple[_Server, str]:
        state = _Server(answer)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return state, f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_requests_share_one_keep_alive_connection_and_carry_the_token(serve: Serve) -> None:
    state, url = await serve(lambda body: _ok(b'{"echo":' + body + b"}"))
    client = HttpClient(url + "/base/", "secret-token")
    try:
        for n in range(3):
            status, raw = await client.post("/internal/v1/ops", b"%d" % n)
            assert (status, raw) == (200, b'{"echo":%d}' % n)
    finally:
        await client.close()
    assert state.connections == 1
    head, body = state.requests[0]
    assert head.startswith(b"POST /base/internal/v1/ops HTTP/1.1\r\n")
    assert b"Authorization: Bearer secret-token\r\n" in head
    assert b"Content-Type: application/json\r\n" in head
    assert body == b"0"


async def test_connection_close_and_a_hang_up_are_followed_by_a_new_connection(
    serve: Serve,
) -> None:
    answers = iter([_ok(b"a", b"Connection: close\r\n"), _ok(b"b"), None, _ok(b"c")])
    state, url = await serve(lambda _body: next(answers))
    client = HttpClient(url, "")
    try:
        assert await client.post("/x", b"1") == (200, b"a")
        assert await client.post("/x", b"2") == (200, b"b")
        with pytest.raises(ValueError, match="no answer: IncompleteReadError"):
            await client.post("/x", b"3")  # the server hangs up instead of answering
        assert await client.post("/x", b"4") == (200, b"c")
    finally:
        await client.close()
    assert state.connections == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "without a Content-Length"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "without a Content-Length"),
        (b"SMTP 220 hello\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x status line"),
    ],
)
async def test_an_answer_the_client_cannot_frame_is_an_error(
    serve: Serve, raw: bytes, message: str
) -> None:
    _state, url = await serve(lambda _body: raw)
    client = HttpClient(url, "")
    try:
        with pytest.raises(ValueError, match=message):
            await client.post("/x", b"{}")
    finally:
        await client.close()


def test_response_head_reads_status_length_and_close() -> None:
    head = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 12\r\nConnection: Close\r\n\r\n"
    assert _response_head(head) == (503, 12, True)
    many = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive, close\r\n\r\n"
    assert _response_head(many) == (200, 1, True)
    # HTTP/1.0 closes unless it says keep-alive.
    assert _response_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n") == (200, 0, True)
    kept = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\n\r\n"
    assert _response_head(kept) == (200, 0, False)
    with pytest.raises(ValueError, match="over"):
        _response_head(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40))


def test_only_http_urls_without_credentials_are_accepted() -> None:
    with pytest.raises(BenchError, match="not an http"):
        HttpClient("ftp://127.0.0.1:21", "")
    with pytest.raises(BenchError, match="not an http"):
        HttpClient("127.0.0.1:8080", "")
    with pytest.raises(BenchError, match="credentials in the URL"):
        HttpClient("http://user:s3cret@127.0.0.1:8080", "")
    with pytest.raises(BenchError, match="bad port"):
        HttpClient("http://127.0.0.1:99999", "")


async def test_the_host_header_names_host_and_port_only(serve: Serve) -> None:
    state, url = await serve(lambda _body: _ok(b"{}"))
    client = HttpClient(url, "")
    try:
        await client.post("/x", b"{}")
    finally:
        await client.close()
    port = url.rsplit(":", 1)[1]
    assert f"Host: 127.0.0.1:{port}\r\n".encode() in state.requests[0][0]


async def test_a_cut_short_or_oversized_answer_fails_and_the_next_request_reconnects(
    serve: Serve,
) -> None:
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",  # then the server hangs up
            b"HTTP/1.1 200 OK\r\nX: " + b"y" * (limits.BENCH_ANSWER_HEAD_BYTES_MAX + 10),
            _ok(b"fine"),
        ]
    )
    state, url = await serve(lambda _body: next(answers))
    client = HttpClient(url, "")
    try:
        with pytest.raises(ValueError, match="IncompleteReadError"):
            await _with_hang_up(client)
        with pytest.raises(ValueError, match="LimitOverrunError"):
            await client.post("/x", b"2")
        assert await client.post("/x", b"3") == (200, b"fine")
    finally:
        await client.close()
    assert state.connections == 3


async def _with_hang_up(client: HttpClient) -> None:
    # The server writes part of the body, then its next readuntil waits; closing is ours.
    task = asyncio.create_task(client.post("/x", b"1"))
    await asyncio.sleep(0.05)
    assert not task.done()
    # No more bytes will come: the client's own time limit would end it; end it sooner.
    client._stream[0].feed_eof()  # type: ignore[index]
    await task


async def test_a_failing_client_pauses_counts_and_lets_others_run(unused_tcp_port: int) -> None:
    client = HttpClient(f"http://127.0.0.1:{unused_tcp_port}", "")  # nobody listens there
    tally = _Tally()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    options = BenchOptions(None, None, "", 1, 1, 2, 3)
    other = asyncio.create_task(ticker())
    deadline = time.perf_counter() + 0.2
    await _client(client, [1, 2], options=options, name="t", deadline=deadline, tally=tally)
    other.cancel()
    attempts = tally.errors // 3
    assert tally.errors == attempts * 3 and tally.ok_ops == 0 and not tally.latencies_ms
    # One refused connection per pause, not thousands in a spin that starves everyone else.
    assert 1 <= attempts <= 0.2 / (limits.BENCH_RETRY_PAUSE_MS / 1000) + 2
    assert ticks >= attempts


async def test_missing_results_count_as_errors(serve: Serve) -> None:
    _state, url = await serve(lambda _body: _ok(b'{"results":[{"status":"ok"},1]}'))
    client = HttpClient(url, "")
    tally = _Tally()
    options = BenchOptions(None, None, "", 1, 1, 2, 4)
    deadline = time.perf_counter() + 0.05
    try:
        await _client(client, [1, 2], options=options, name="t", deadline=deadline, tally=tally)
    finally:
        await client.close()
    requests = len(tally.latencies_ms)
    assert requests > 0
    assert (tally.ok_ops, tally.errors) == (requests, 3 * requests)
