"""The terminal listener: asyncio streams, one task per connection, hard limits everywhere.

Framing lost (a length of 0 or over the cap, EOF in the middle of a frame, a bad TPDU, a
frame that does not arrive whole in time) closes that connection without a reply; a
message that frames but does not decode is answered with a response code and the connection
stays open (until too many in a row). One connection's garbage, flood or silence never
reaches another: each has its own task, every exception stays inside it, and every wait is
bounded.

The idle and frame timeouts are kept by one watchdog task for all connections, not by a
timer per read: each connection notes when its current wait began (a first byte, or the
rest of a frame), and every `GATEWAY_WATCHDOG_MS` the watchdog aborts those past their
limit (so a limit holds to within that period). A timer per read cost two timer handles per
message, about 5 % of a purchase's CPU.

Shutdown (`close`) stops accepting, answers what is read from then on without the host, lets
the requests in hand finish within a bound, then closes every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl

from cardcore import limits
from cardcore.cards.model import is_terminal_id
from cardcore.frontend_gateway import codec
from cardcore.frontend_gateway.processor import Processor
from cardcore.metrics import Metrics

log = logging.getLogger(__name__)


class _Wait(enum.Enum):
    """What a connection waits for; the value labels a frame the watchdog cut short."""

    FIRST_BYTE = "idle"  # between frames: the idle timeout
    FRAME = "slow"  # a frame begun: the frame timeout
    NONE = ""  # a request in hand, or a reply being written: bounded elsewhere


class _Line:
    """One connection as the watchdog sees it: what it waits for, since when, and why the
    watchdog closed it (the wait it ran out of)."""

    __slots__ = ("closed_for", "since", "transport", "waiting")

    def __init__(self, transport: asyncio.WriteTransport, now: float) -> None:
        self.transport = transport
        self.waiting = _Wait.FIRST_BYTE
        self.since = now
        self.closed_for = _Wait.NONE

    def closed(self) -> bool:
        """Whether the watchdog closed it (its reads end; what they got is too late)."""
        return self.closed_for is not _Wait.NONE


class GatewayServer:
    def __init__(
        self,
        processor: Processor,
        metrics: Metrics,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        connections_max: int = limits.GATEWAY_CONNECTIONS_MAX,
        frame_bytes_max: int = limits.GATEWAY_FRAME_BYTES_MAX,
        idle_s: float = limits.GATEWAY_IDLE_S,
        frame_read_s: float = limits.GATEWAY_FRAME_READ_S,
        shared_port: bool = False,
    ) -> None:
        self.processor = processor
        self.shared_port = shared_port
        self.metrics = metrics
        self.host = host
        self.port = port
        self.tls = tls
        self.connections_max = connections_max
        self.frame_bytes_max = frame_bytes_max
        self.idle_s = idle_s
        self.frame_read_s = frame_read_s
        self.connections: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()  # connections with a request in hand
        self._lines: set[_Line] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._closing = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept,
            self.host,
            self.port,
            ssl=self.tls,
            reuse_address=True,
            # several gateway processes on one port only when asked: else a second listener
            # (another host's gateway) fails here instead of taking half the terminals
            reuse_port=self.shared_port and hasattr(socket, "SO_REUSEPORT"),
            backlog=limits.GATEWAY_LISTEN_BACKLOG_MAX,
            ssl_handshake_timeout=limits.GATEWAY_TLS_HANDSHAKE_S if self.tls else None,
            limit=self.frame_bytes_max + codec.LENGTH_BYTES,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._watchdog = asyncio.create_task(self._watch(), name="gateway-watchdog")

    async def close(self, grace_s: float = limits.GATEWAY_SHUTDOWN_GRACE_S) -> None:
        """Graceful shutdown, in order:

        1. stop accepting connections;
        2. from now on, answer a request read on an open connection without sending it to
           the host (`Processor.drain`: 96), and close each connection once its reply is out;
        3. wait, `grace_s` at most in all, for every connection with a request in hand,
           including one that took its request during this wait;
        4. close every connection. A request the bound cuts off at the host leaves its
           reversal in store and forward (`Processor._financial`).
        """
        self._closing = True
        self.processor.drain()
        if self._server is not None:
            self._server.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._busy:
            left_s = deadline - loop.time()
            if left_s <= 0:
                break
            # A busy connection ends after its reply (it is closing): wait for the tasks.
            await asyncio.wait(set(self._busy), timeout=left_s)
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.gather(*self.connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing or len(self.connections) >= self.connections_max:
            self.metrics.gateway_frames_dropped.labels("connection_cap").inc()
            writer.transport.abort()
            return
        self.connections.add(task)
        line = _Line(writer.transport, asyncio.get_running_loop().time())
        self._lines.add(line)
        self.metrics.gateway_connections.inc()
        try:
            await self._serve(reader, writer, task, line)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("terminal connection failed")
        finally:
            self.connections.discard(task)
            self._busy.discard(task)
            self._lines.discard(line)
            self.metrics.gateway_connections.dec()
            writer.transport.abort()

    async def _watch(self) -> None:
        """Every `GATEWAY_WATCHDOG_MS`: abort the connections idle longer than `idle_s`, or
        in the middle of a frame longer than `frame_read_s` (their reads then end)."""
        loop = asyncio.get_running_loop()
        limit_of = {_Wait.FIRST_BYTE: self.idle_s, _Wait.FRAME: self.frame_read_s}
        while True:
            await asyncio.sleep(limits.GATEWAY_WATCHDOG_MS / 1000)
            now = loop.time()
            for line in list(self._lines):
                limit = limit_of.get(line.waiting)
                if limit is not None and now - line.since >= limit:
                    line.closed_for = line.waiting
                    line.waiting = _Wait.NONE
                    try:
                        line.transport.abort()
                    except Exception:  # one connection's failure never stops the watchdog
                        log.exception("a connection could not be closed")

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[None],
        line: _Line,
    ) -> None:
        bad_in_a_row = 0
        bound: str | None = None  # the terminal id its client certificate names, if asked for
        if self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED:
            bound = terminal_of_certificate(writer.get_extra_info("peercert"))
            if bound is None:
                self.metrics.gateway_frames_dropped.labels("client_cert").inc()
                return
        while not self._closing:
            payload = await self._read_frame(reader, line)
            if payload is None:
                return
            try:
                frame = codec.split_frame(payload)
            except codec.FrameError:
                self.metrics.gateway_frames_dropped.labels("bad_tpdu").inc()
                return
            self._busy.add(task)
            try:
                # Read after shutdown began, it is answered 96 without reaching the host, and
                # the loop then ends (`close`).
                reply = await self.processor.handle(frame.body, bound)
                if reply is None:
                    bad_in_a_row += 1
                    if bad_in_a_row >= limits.GATEWAY_BAD_FRAMES_MAX:
                        self.metrics.gateway_frames_dropped.labels("garbage").inc()
                        return
                    continue
                bad_in_a_row = 0
                out = codec.pack_frame(
                    codec.reply_tpdu(frame.tpdu),
                    codec.reply_header(frame.header, processing=reply.processing),
                    reply.body,
                )
                writer.write(out)
                if not writer.transport.get_write_buffer_size():
                    continue  # all of it went to the socket: nothing to wait for
                try:
                    async with asyncio.timeout(limits.GATEWAY_WRITE_S):
                        await writer.drain()
                except (TimeoutError, ConnectionError):
                    self.metrics.gateway_frames_dropped.labels("write").inc()
                    return
            finally:
                self._busy.discard(task)

    async def _read_frame(self, reader: asyncio.StreamReader, line: _Line) -> bytes | None:
        """One frame's payload, or None when the connection must close. The first byte may
        take the idle timeout; the rest of the frame must follow within the frame timeout,
        so a sender trickling bytes cannot hold a connection (the watchdog keeps both)."""
        loop = asyncio.get_running_loop()
        line.waiting, line.since = _Wait.FIRST_BYTE, loop.time()
        try:
            first = await reader.readexactly(1)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None  # idle too long, or closed between frames: a clean end
        if line.closed():
            return None  # closed for idling as its first byte came in
        line.waiting, line.since = _Wait.FRAME, loop.time()
        try:
            prefix = first + await reader.readexactly(1)
            length = codec.frame_length(prefix, frame_bytes_max=self.frame_bytes_max)
            payload = await reader.readexactly(length)
        except codec.FrameError:
            self.metrics.gateway_frames_dropped.labels("length").inc()
            return None
        except (asyncio.IncompleteReadError, ConnectionError):
            reason = line.closed_for.value if line.closed() else "truncated"
            self.metrics.gateway_frames_dropped.labels(reason).inc()
            return None
        if line.closed():
            # The watchdog closed it as the last bytes came in: too late, never processed
            # (its reply could not be sent; the terminal reverses what it does not hear).
            self.metrics.gateway_frames_dropped.labels(line.closed_for.value).inc()
            return None
        line.waiting = _Wait.NONE
        return payload


def terminal_of_certificate(peercert: object) -> str | None:
    """The terminal id a verified client certificate names: its subject's one common name,
    8 letters and digits (F41); None for anything else."""
    if not isinstance(peercert, dict):
        return None
    names = [
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    if len(names) != 1 or not isinstance(names[0], str):
        return None
    return names[0] if is_terminal_id(names[0]) else None
