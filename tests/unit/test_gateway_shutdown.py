"""Graceful shutdown of the gateway (`GatewayServer.close`): stop accepting, finish the requests
in hand within a bound, then close. A request in hand gets its reply; a request read once
shutdown has begun is answered 96 and never reaches the host; a connection that takes a
request during the grace is waited for; a request the bound cuts off at the host leaves its
reversal in store and forward, never applied without a reply and without a reversal.

A real `GatewayServer` and `Processor` on loopback, the reference terminal, and a host that
works in its own task, as `InProcessHost` does: a cancelled caller does not stop it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cardcore import limits
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.processor import Processor, Reply
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.server import GatewayServer
from cardcore.frontend_gateway.terminal import PosTerminal, TerminalError
from cardcore.metrics import Metrics

pytestmark = pytest.mark.timeout(60)

KEK = bytes(range(32))
TMK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
MID = "SHUTDOWNMERCH01"
PAN = "6288880000000013"
HOST_S = 1.0  # how long the host takes over each request but a sign-on
REPLY_S_MAX = 5.0  # a reply that is due comes within this


@dataclass
class Host:
    """Approves everything after `HOST_S`, in a task of its own (`InProcessHost` does the same:
    a caller that stops waiting does not stop the host)."""

    delay_s: float = HOST_S
    applied: list[tuple[Kind, str, str]] = field(default_factory=list)
    calls: set[asyncio.Task[list[PosResult]]] = field(default_factory=set)

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        call = asyncio.ensure_future(self._pos(requests))
        self.calls.add(call)
        call.add_done_callback(self.calls.discard)
        return await asyncio.shield(call)

    async def _pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        out = []
        for r in requests:
            if r.kind is Kind.SIGN_ON:
                sealed = security.seal(KEK, TMK, b"tmk:" + r.terminal.encode()).hex()
                out.append(
                    PosResult(Outcome.APPROVED, batch="000001", mid=MID, key_mode="aes",
                              tmk_sealed=sealed)
                )  # fmt: skip
                continue
            await asyncio.sleep(self.delay_s)
            self.applied.append((r.kind, r.terminal, r.stan))
            out.append(
                PosResult(Outcome.APPROVED, balance=1, rrn="000000000001", auth_code="000001")
            )
        return out

    async def settle(self) -> None:
        """Wait until every call the host took has run to its end."""
        if self.calls:
            await asyncio.wait(set(self.calls), timeout=REPLY_S_MAX)

    async def close(self) -> None:
        return None


@dataclass
class Gateway:
    server: GatewayServer
    processor: Processor
    host: Host
    saf: ReversalQueue

    async def terminal(self, tid: str) -> PosTerminal:
        t = PosTerminal("127.0.0.1", self.server.port, tid, MID, TMK, KeyMode.AES, timeout_s=10)
        assert (await t.sign_on()).code == "00"
        return t

    def reversals(self) -> list[tuple[Kind, str, str]]:
        return sorted((r.kind, r.terminal, r.stan) for r in self.saf.pending.values())


class SlowProcessor(Processor):
    """Takes `HOST_S` over every message before handling it, an echo too."""

    async def handle(self, body: bytes, bound: str | None = None) -> Reply | None:
        await asyncio.sleep(HOST_S)
        return await super().handle(body, bound)


async def _start(tmp_path: Path, processor_class: type[Processor] = Processor) -> Gateway:
    saf = ReversalQueue(tmp_path / "saf.jsonl")
    saf.open()
    host = Host()
    metrics = Metrics()
    processor = processor_class(host, saf, KEK, metrics)
    server = GatewayServer(processor, metrics, host="127.0.0.1", port=0)
    await server.start()
    return Gateway(server, processor, host, saf)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    g = await _start(tmp_path)
    yield g
    await g.server.close(grace_s=0)
    await g.host.settle()
    await g.saf.close()


async def _in_flight(t: PosTerminal, amount: int) -> asyncio.Task[object]:
    """A purchase sent, and at the host (not answered yet) when this returns."""
    task: asyncio.Task[object] = asyncio.create_task(t.purchase(PAN, amount))
    await asyncio.sleep(HOST_S / 4)
    return task


async def test_a_request_in_flight_at_shutdown_gets_its_reply(gateway: Gateway) -> None:
    a = await gateway.terminal("SHUTA001")
    sale = await _in_flight(a, 100)
    started = time.monotonic()
    await gateway.server.close(grace_s=limits.GATEWAY_SHUTDOWN_GRACE_S)
    closed_s = time.monotonic() - started
    reply = await asyncio.wait_for(sale, REPLY_S_MAX)
    assert getattr(reply, "code", None) == "00"
    assert gateway.host.applied == [(Kind.PURCHASE, "SHUTA001", a.stan)]
    assert gateway.reversals() == []
    assert closed_s < HOST_S + 1  # done when the request is, not at the end of the grace


async def test_a_request_read_during_the_grace_is_answered_96_and_its_reversal_stored(
    gateway: Gateway,
) -> None:
    a = await gateway.terminal("SHUTA001")
    b = await gateway.terminal("SHUTB001")  # its connection stays open, idle
    sale_a = await _in_flight(a, 100)
    closing = asyncio.create_task(gateway.server.close(grace_s=limits.GATEWAY_SHUTDOWN_GRACE_S))
    await asyncio.sleep(0)  # shutdown has begun

    refused = await asyncio.wait_for(b.purchase(PAN, 200), REPLY_S_MAX)
    assert refused.code == "96", refused.fields
    assert "64" in refused.fields  # MAC'd: the terminal can trust it (and it did verify)
    assert b.pending_reversal is None  # a definite answer: nothing for the terminal to undo
    with pytest.raises(TerminalError, match="no reply"):  # closed after that reply
        await b.read_reply()

    assert getattr(await asyncio.wait_for(sale_a, REPLY_S_MAX), "code", None) == "00"
    await asyncio.wait_for(closing, REPLY_S_MAX)
    await gateway.host.settle()
    assert gateway.host.applied == [(Kind.PURCHASE, "SHUTA001", a.stan)]  # B's never
    # B's 96 says "reversed if done": B could have been the resend of an original still at
    # the host, so its reversal is stored, as on any 96 (for a request never sent, the
    # host only leaves its tombstone when it is delivered).
    assert gateway.reversals() == [(Kind.REVERSE, "SHUTB001", b.stan)]


async def test_a_connection_that_takes_a_request_during_the_grace_is_waited_for(
    tmp_path: Path,
) -> None:
    g = await _start(tmp_path, SlowProcessor)
    try:
        a = await g.terminal("SHUTA001")
        b = await g.terminal("SHUTB001")
        echo_a = asyncio.create_task(a.echo())
        await asyncio.sleep(HOST_S / 4)  # A's echo is in hand: the grace begins
        closing = asyncio.create_task(g.server.close(grace_s=limits.GATEWAY_SHUTDOWN_GRACE_S))
        await asyncio.sleep(HOST_S / 2)
        echo_b = asyncio.create_task(b.echo())  # in hand until after A's is answered
        assert (await asyncio.wait_for(echo_a, REPLY_S_MAX)).code == "00"
        assert (await asyncio.wait_for(echo_b, REPLY_S_MAX)).code == "00"
        await asyncio.wait_for(closing, REPLY_S_MAX)
    finally:
        await g.server.close(grace_s=0)
        await g.saf.close()


async def test_a_request_cut_by_the_grace_bound_leaves_its_reversal_stored(
    gateway: Gateway,
) -> None:
    a = await gateway.terminal("SHUTA001")
    sale = await _in_flight(a, 100)
    await gateway.server.close(grace_s=HOST_S / 4)  # ends while the host still works on it
    with pytest.raises(TerminalError, match="no reply"):
        await asyncio.wait_for(sale, REPLY_S_MAX)
    # Stored before close() returned, so before the store closes (RunningGateway.close).
    assert gateway.reversals() == [(Kind.REVERSE, "SHUTA001", a.stan)]
    await gateway.host.settle()
    # The host applied it after all: the stored reversal is what undoes it.
    assert gateway.host.applied == [(Kind.PURCHASE, "SHUTA001", a.stan)]
    assert any(r.batch == a.batch for r in gateway.saf.pending.values())


async def test_a_reversal_cut_by_the_grace_bound_is_stored_to_be_delivered(
    gateway: Gateway,
) -> None:
    a = await gateway.terminal("SHUTA001")
    fields = a._base("0400", "000000", "22")
    fields |= {"4": "000000000100", "25": "00", "39": "98", "49": "156"}
    reversal = asyncio.create_task(a.exchange(fields, mac=True))
    await asyncio.sleep(HOST_S / 4)
    await gateway.server.close(grace_s=HOST_S / 4)
    with pytest.raises(TerminalError, match="no reply"):
        await asyncio.wait_for(reversal, REPLY_S_MAX)
    assert gateway.reversals() == [(Kind.REVERSE, "SHUTA001", fields["11"])]


@pytest.mark.parametrize(
    ("mti", "pcode", "net"),
    [
        ("0800", None, "005"),  # sign-on
        ("0400", "000000", "000"),  # reversal
        ("0500", None, "201"),  # settlement
        ("0320", None, "201"),  # batch upload
        ("0200", "310000", "000"),  # inquiry
    ],
)
async def test_once_draining_nothing_goes_to_the_host(
    tmp_path: Path, mti: str, pcode: str | None, net: str
) -> None:
    g = await _start(tmp_path)
    try:
        a = await g.terminal("SHUTA001")
        g.processor.drain()
        fields = a._base(mti, pcode, "00", net)
        if mti in ("0200", "0400"):
            fields |= {"2": PAN, "4": "000000000100", "25": "00", "49": "156"}
        if mti == "0400":
            del fields["2"]
            fields["39"] = "98"
        if mti == "0500":
            fields["48"] = codec.format_totals(codec.Totals(0, 0, 0, 0), "0")
        if mti == "0320":
            fields["48"] = "000001000000000100"
        reply = await a.exchange(fields, mac=True)
        assert reply.code == "96", reply.fields
        assert g.host.applied == []
        assert g.reversals() == []
        assert (await a.echo()).code == "00"  # the host is not needed for an echo
    finally:
        await g.server.close(grace_s=0)
        await g.saf.close()


def test_the_grace_outlasts_the_host_timeout() -> None:
    """A request at the host when shutdown begins is answered (at worst 96, its reversal
    stored) before the grace ends: the bound cuts only a host adapter that overruns."""
    assert limits.GATEWAY_SHUTDOWN_GRACE_S * 1000 > limits.GATEWAY_HOST_TIMEOUT_MS
