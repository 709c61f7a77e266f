"""The benchmark's own HTTP client (`cardcore.bench.HttpClient`) against a loopback server
that answers as told: keep-alive, closing, malformed and cut-short answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from cardcore.bench import BenchError, HttpClient, _response_head

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
    assert _response_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n") == (200, 0, False)


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(BenchError, match="not an http"):
        HttpClient("ftp://127.0.0.1:21", "")
    with pytest.raises(BenchError, match="not an http"):
        HttpClient("127.0.0.1:8080", "")
