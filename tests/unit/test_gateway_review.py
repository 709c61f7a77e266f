"""What a review found about money on the gateway's error paths, pinned: a 96 never leaves a
request applied without its reversal on disk; a resend never races that reversal; voids and
top-up confirmations are never reversed behind the cashier's back; a batch is not settled
while reversals are owed; the store-and-forward file is one process's, survives a failing
host and refuses to start on a damaged file; one bad read never fails a whole host call."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from cardcore import limits
from cardcore.cards.model import Kind, Outcome, PosRequest, PosResult, Settlement, Terminal
from cardcore.cards.pos import PosService, _reversal_answer, _same_totals
from cardcore.frontend_gateway import codec, security
from cardcore.frontend_gateway.host import HostUnavailable, HttpHost
from cardcore.frontend_gateway.processor import Processor
from cardcore.frontend_gateway.saf import ReversalQueue, SafDamaged, SafFull, SafLocked
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import PosTerminal, Reply, TerminalError
from cardcore.ledger.model import Result
from cardcore.metrics import Metrics
from tests.helpers import ClaimsInMemory

KEK = bytes(range(32))
TMK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
TID, MID, PAN = "REVIEW01", "REVIEWMERCHANT1", "6288880000000013"


@dataclass
class Host:
    """Answers sign-on; then each call either answers `outcome` or is silent."""

    silent: bool = False
    outcome: Outcome = Outcome.APPROVED
    seen: list[PosRequest] = field(default_factory=list)

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        out = []
        for r in requests:
            if r.kind is Kind.SIGN_ON:
                sealed = security.seal(KEK, TMK, b"tmk:" + TID.encode()).hex()
                out.append(
                    PosResult(Outcome.APPROVED, batch="000001", mid=MID, key_mode="aes",
                              tmk_sealed=sealed)
                )  # fmt: skip
                continue
            self.seen.append(r)
            if self.silent:
                raise HostUnavailable("silent")
            out.append(PosResult(self.outcome, balance=100, rrn="000000000009", totals=(0, 0, 0, 0),
                                 balanced=True))  # fmt: skip
        return out

    async def close(self) -> None:
        return None


async def _gateway(tmp_path: Path, entries_max: int = 100) -> tuple[Processor, Host, PosTerminal]:
    host = Host()
    saf = ReversalQueue(tmp_path / "saf.jsonl", entries_max=entries_max)
    saf.open()
    processor = Processor(host, saf, KEK, Metrics())
    terminal = PosTerminal("unused", 0, TID, MID, TMK, KeyMode.AES)
    reply = await processor.handle(codec.encode(terminal._base("0800", None, "00", "005")))
    assert reply is not None
    fields = codec.decode(reply.body)
    terminal.keys = security.read_working_keys(KeyMode.AES, TMK, bytes.fromhex(fields["62"]))
    return processor, host, terminal


def _purchase(t: PosTerminal, stan: str | None = None) -> bytes:
    fields = t._base("0200", "000000", "22")
    if stan is not None:
        fields["11"] = stan
    fields |= {"2": PAN, "4": "000000000100", "22": "012", "25": "00", "49": "156"}
    return t.encode(fields, mac=True)


def _code(reply: Any) -> str:
    return str(codec.decode(reply.body)["39"])


async def test_a_96_always_has_its_reversal_stored_and_a_resend_is_never_forwarded(
    tmp_path: Path,
) -> None:
    processor, host, t = await _gateway(tmp_path)
    host.silent = True
    body = _purchase(t)
    assert _code(await processor.handle(body)) == "96"
    assert [(r.kind, r.stan) for r in processor.saf.pending.values()] == [(Kind.REVERSE, t.stan)]
    host.silent, host.seen = False, []
    # The same request again while its reversal waits: 12, and the host never sees it.
    assert _code(await processor.handle(body)) == "12"
    assert host.seen == []


async def test_no_room_for_a_reversal_means_no_request_goes_to_the_host(tmp_path: Path) -> None:
    processor, host, t = await _gateway(tmp_path, entries_max=1)
    host.silent = True
    assert _code(await processor.handle(_purchase(t))) == "96"  # takes the one slot
    host.silent, host.seen = False, []
    assert _code(await processor.handle(_purchase(t))) == "96"
    assert host.seen == []  # refused before the host: a 96 is never unbacked


async def test_when_the_reversal_cannot_be_written_the_terminal_hears_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor, host, t = await _gateway(tmp_path)
    host.silent = True

    def disk_full(_text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(processor.saf._file, "write", disk_full)
    assert await processor.handle(_purchase(t)) is None  # the terminal reverses by itself
    host.silent = False
    # Until the file is rewritten, nothing that would need a reversal goes out.
    assert _code(await processor.handle(_purchase(t))) == "96"


@pytest.mark.parametrize(
    ("pcode", "txn", "extra"),
    [
        ("200000", "23", {"61": "000001000001"}),  # void
        ("630000", "49", {"61": "000001000001"}),  # top-up confirmation (0220)
    ],
)
async def test_voids_and_confirmations_are_not_reversed_on_a_96(
    tmp_path: Path, pcode: str, txn: str, extra: dict[str, str]
) -> None:
    processor, host, t = await _gateway(tmp_path)
    host.silent = True
    mti = "0220" if pcode == "630000" else "0200"
    fields = t._base(mti, pcode, txn) | {"4": "000000000100", "25": "00", "49": "156"} | extra
    if pcode == "200000":
        fields |= {"2": PAN, "22": "012"}
    assert _code(await processor.handle(t.encode(fields, mac=True))) == "96"
    assert processor.saf.pending == {}


async def test_settlement_waits_for_the_reversals_the_gateway_owes(tmp_path: Path) -> None:
    processor, host, t = await _gateway(tmp_path)
    host.silent = True
    await processor.handle(_purchase(t))
    host.silent = False
    settle = t._base("0500", None, "00", "201") | {"48": "0" * 31, "49": "156"}
    assert _code(await processor.handle(t.encode(settle, mac=True))) == "96"
    assert await processor.saf.deliver(host) == 1
    # Delivered from store and forward: taken by the host even after a batch was settled.
    assert [(r.kind, r.forwarded) for r in host.seen[-1:]] == [(Kind.REVERSE, True)]
    settle = t._base("0500", None, "00", "201") | {"48": "0" * 31, "49": "156"}
    assert _code(await processor.handle(t.encode(settle, mac=True))) == "00"


async def test_one_store_and_forward_file_per_process(tmp_path: Path) -> None:
    first = ReversalQueue(tmp_path / "saf.jsonl")
    first.open()
    with pytest.raises(SafLocked):
        ReversalQueue(tmp_path / "saf.jsonl").open()
    await first.close()
    again = ReversalQueue(tmp_path / "saf.jsonl")
    again.open()  # released on close
    await again.close()


async def test_a_torn_last_line_is_skipped_and_a_damaged_one_refuses_to_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "saf.jsonl"
    owed = {"kind": "reverse", "terminal": TID, "batch": "000001", "stan": "000007"}
    path.write_text(json.dumps({"add": 1, "request": owed}) + '\n{"add": 2, "requ')
    queue = ReversalQueue(path)
    queue.open()
    assert [r.stan for r in queue.pending.values()] == ["000007"]
    await queue.close()
    path.write_text('{"add": 1, "requ\n' + json.dumps({"add": 2, "request": owed}) + "\n")
    with pytest.raises(SafDamaged):
        ReversalQueue(path).open()
    # A byte that is not UTF-8 is damage too (it raised UnicodeDecodeError, a traceback)
    path.write_bytes(json.dumps({"add": 1, "request": owed}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(SafDamaged, match="damaged at line 2"):
        ReversalQueue(path).open()
    assert path.read_bytes().endswith(b"\xff\xfe\n")  # left as it was for the operator


async def test_delivery_outlives_a_host_that_fails_unexpectedly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    processor, host, t = await _gateway(tmp_path)
    host.silent = True
    await processor.handle(_purchase(t))
    calls = 0

    class Flaky:
        async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug on the way")
            return [PosResult(Outcome.APPROVED) for _ in requests]

        async def close(self) -> None:
            return None

    caplog.set_level(logging.ERROR)
    processor.saf.start(Flaky())
    try:
        for _ in range(100):
            if not processor.saf.pending:
                break
            processor.saf._wake.set()
            await _sleep(0.05)
        assert processor.saf.pending == {}
        assert calls >= 2
    finally:
        await processor.saf.close()


async def _sleep(seconds: float) -> None:
    import asyncio  # noqa: PLC0415

    await asyncio.sleep(seconds)


def test_a_reversal_the_ledger_cannot_apply_stops_the_terminal_resending() -> None:
    refused = Result(ok=False, code="id_already_failed", original_code="exceeds_credits")
    assert _reversal_answer(refused).outcome is Outcome.ALREADY_REVERSED  # 12, and logged
    other = Result(ok=False, code="exists_with_different_op", field="op")
    assert _reversal_answer(other).outcome is Outcome.DUPLICATE_MISMATCH


def test_settlement_counts_compare_modulo_1000() -> None:
    assert _same_totals((5000, 1001, 0, 0), (5000, 1, 0, 0))
    assert not _same_totals((5000, 1001, 0, 0), (5001, 1, 0, 0))
    assert not _same_totals((5000, 1001, 0, 0), (5000, 2, 0, 0))


class _Directory(ClaimsInMemory):
    """One terminal; reading another fails as a database timeout would."""

    terminal_record = Terminal(TID, MID, "S", "LE", "aes", "00", "active", "000001", 0, 1, 2)

    async def terminal(self, tid: str) -> Terminal | None:
        if tid == "BROKEN01":
            raise OperationalError("select", {}, Exception("statement timeout"))
        return self.terminal_record

    async def warm_cards(self, tokens: list[str]) -> None:
        return None  # each card is read with its request


async def test_one_failed_read_answers_only_its_own_request() -> None:
    service = PosService(ledger=None, directory=_Directory(), token_key=b"k")  # type: ignore[arg-type]
    answers = await service.handle(
        [
            PosRequest(kind=Kind.SIGN_ON, terminal=TID),
            PosRequest(kind=Kind.SIGN_ON, terminal="BROKEN01"),
            PosRequest(kind=Kind.SIGN_ON, terminal=TID),
        ]
    )
    assert [a.outcome for a in answers] == [
        Outcome.APPROVED,
        Outcome.UNAVAILABLE,
        Outcome.APPROVED,
    ]


async def test_an_unknown_terminal_is_not_asked_about_again_at_once(tmp_path: Path) -> None:
    asked: list[str] = []

    class Unknown:
        async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
            asked.extend(r.terminal for r in requests)
            return [PosResult(Outcome.TERMINAL_UNKNOWN) for _ in requests]

        async def close(self) -> None:
            return None

    saf = ReversalQueue(tmp_path / "saf.jsonl")
    saf.open()
    processor = Processor(Unknown(), saf, KEK, Metrics())
    stranger = PosTerminal("unused", 0, "NOSUCH01", MID, TMK, KeyMode.AES)
    for _ in range(5):
        body = codec.encode(stranger._base("0800", None, "00", "005"))
        assert _code(await processor.handle(body)) == "97"
    assert asked == ["NOSUCH01"]  # a sign-on flood costs the host one question
    await saf.close()


def test_a_batch_above_the_open_one_belongs_to_the_cycle_before_the_wrap() -> None:
    from dataclasses import replace  # noqa: PLC0415

    from cardcore.cards.model import transaction_key  # noqa: PLC0415

    wrapped = replace(_Directory.terminal_record, batch="000002", batch_cycle=1)
    assert transaction_key(wrapped, "000002", "000009") == f"{TID}/1/000002/000009"
    # A reversal stored before the wrap, for batch 999999, reaches the old key space.
    assert transaction_key(wrapped, "999999", "000009") == f"{TID}/0/999999/000009"
    first = replace(_Directory.terminal_record, batch="000007", batch_cycle=0)
    assert transaction_key(first, "000009", "000001") == f"{TID}/0/000009/000001"


async def test_a_settlement_sent_again_after_its_reply_was_lost_gets_the_same_answer() -> None:
    class Settled(_Directory):
        terminal_record = Terminal(TID, MID, "S", "LE", "aes", "00", "active", "000008", 0, 1, 2)

        async def settlement(self, tid: str, cycle: int, batch: str) -> Settlement | None:
            if (tid, cycle, batch) == (TID, 0, "000007"):
                return Settlement((900, 2, 0, 0), (900, 2, 0, 0), balanced=True)
            return None

    service = PosService(ledger=None, directory=Settled(), token_key=b"k")  # type: ignore[arg-type]
    again = PosRequest(kind=Kind.SETTLE, terminal=TID, batch="000007", totals=(900, 2, 0, 0))
    [answer] = await service.handle([again])
    assert (answer.outcome, answer.totals, answer.balanced) == (
        Outcome.APPROVED,
        (900, 2, 0, 0),
        True,
    )
    other = PosRequest(kind=Kind.SETTLE, terminal=TID, batch="000007", totals=(901, 2, 0, 0))
    [refused] = await service.handle([other])
    assert refused.outcome is Outcome.BATCH_MISMATCH  # not that settlement: sign on again


async def test_an_expired_card_still_takes_a_void_and_a_refund() -> None:
    from cardcore.cards.model import Card  # noqa: PLC0415
    from cardcore.cards.pos import card_token  # noqa: PLC0415

    expired = Card(card_token(b"k", PAN), "masked", "LE", 41, "2001", "active", 0)
    original = {
        "id": 9,
        "key": f"{TID}/0/000001/000001",
        "kind": "posted",
        "reason": "purchase",
        "postings": [(41, "debit", 500), (1, "credit", 500)],
        "metadata": {"store": "S", "terminal": TID},
    }

    class Cards(_Directory):
        async def card(self, token: str) -> Card | None:
            return expired if token == expired.token else None

        async def transfer_by_key(self, key: str) -> dict[str, Any] | None:
            return original if key == original["key"] else None

        async def transfer_by_id(self, transfer_id: int) -> dict[str, Any] | None:
            return original if transfer_id == original["id"] else None

        async def reversals_of(self, transfer_id: int) -> list[dict[str, Any]]:
            return []  # never voided

    class Ledger:
        async def submit(self, ops: Sequence[Any]) -> list[Result]:
            return [Result(ok=True, code="ok", transfer_id=10 + i) for i in range(len(ops))]

    service = PosService(ledger=Ledger(), directory=Cards(), token_key=b"k")  # type: ignore[arg-type]
    common = {"terminal": TID, "batch": "000001", "card": PAN, "amount": 500}
    void, refund, purchase = await service.handle(
        [
            PosRequest(kind=Kind.VOID, stan="000002", original_batch="000001",
                       original_stan="000001", **common),  # type: ignore[arg-type]
            PosRequest(kind=Kind.REFUND, stan="000003", rrn="000000000009", **common),  # type: ignore[arg-type]
            PosRequest(kind=Kind.PURCHASE, stan="000004", **common),  # type: ignore[arg-type]
        ]
    )  # fmt: skip
    assert (void.outcome, refund.outcome) == (Outcome.APPROVED, Outcome.APPROVED)
    assert purchase.outcome is Outcome.CARD_EXPIRED


# --- the reversal file under faults (second review) -----------------------------------------


def _owed(stan: str) -> PosRequest:
    return PosRequest(kind=Kind.REVERSE, terminal=TID, batch="000001", stan=stan)


class _Confirming:
    """Confirms every reversal; a call holding one of `poison` fails as a whole."""

    def __init__(self, poison: frozenset[str] = frozenset(), stuck: str = "") -> None:
        self.poison, self.stuck = poison, stuck
        self.delivered: list[str] = []

    async def pos(self, requests: Sequence[PosRequest]) -> list[PosResult]:
        if any(r.stan in self.poison for r in requests):
            raise HostUnavailable("the whole call failed")
        self.delivered += [r.stan for r in requests if r.stan != self.stuck]
        return [
            PosResult(Outcome.UNAVAILABLE if r.stan == self.stuck else Outcome.APPROVED)
            for r in requests
        ]

    async def close(self) -> None:
        return None


class _TornOnce:
    """The reversal file's handle: the next write puts half its text down, then fails."""

    def __init__(self, real: Any) -> None:
        self.real, self.tear = real, True

    def write(self, text: str) -> int:
        if self.tear:
            self.tear = False
            self.real.write(text[: len(text) // 2])
            self.real.flush()
            raise OSError(28, "No space left on device")
        return int(self.real.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_two_files_differing_only_in_suffix_rewrite_through_their_own_temporaries(
    tmp_path: Path,
) -> None:
    """`gateway-saf.1` and `gateway-saf.2` (one file per process): each rewrite goes through
    a temporary named after its own file, so one never renames the other's lines over its
    own."""
    a, b = ReversalQueue(tmp_path / "gateway-saf.1"), ReversalQueue(tmp_path / "gateway-saf.2")
    made: list[str] = []
    real_replace = Path.replace

    def replace(self: Path, target: Path) -> Path:
        made.append(self.name)
        return real_replace(self, target)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "replace", replace)
        a.open()
        b.open()
    assert made == ["gateway-saf.1.tmp", "gateway-saf.2.tmp"]
    await a.close()
    await b.close()


async def test_a_torn_append_is_repaired_before_any_done_record_follows_it(
    tmp_path: Path,
) -> None:
    """An add's append fails half way (disk full): the round that then confirms a reversal
    rewrites the file instead of appending after the torn line, so the gateway starts
    again (and owes what it owed)."""
    path = tmp_path / "saf.jsonl"
    queue = ReversalQueue(path)
    queue.open()
    await queue.add(_owed("000001"))
    await queue.add(_owed("000003"))
    queue._file = _TornOnce(queue._file)
    with pytest.raises(SafFull):
        await queue.add(_owed("000002"))
    assert await queue.deliver(_Confirming(poison=frozenset({"000003"}))) == 0
    queue._span = 1  # only 000001 this round
    queue._after = 0
    assert await queue.deliver(_Confirming()) == 1
    await queue.close()
    again = ReversalQueue(path)
    again.open()  # not SafDamaged
    assert [r.stan for r in again.pending.values()] == ["000003"]
    await again.close()


async def test_a_reversal_whose_call_keeps_failing_holds_up_no_other(tmp_path: Path) -> None:
    queue = ReversalQueue(tmp_path / "saf.jsonl")
    queue.open()
    for stan in ("000001", "000002", "000003"):
        await queue.add(_owed(stan))
    host = _Confirming(poison=frozenset({"000001"}))
    for _ in range(8):
        await queue.deliver(host)
    assert [r.stan for r in queue.pending.values()] == ["000001"]
    assert sorted(host.delivered) == ["000002", "000003"]
    await queue.close()


async def test_the_file_is_compacted_while_a_reversal_stays_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "GATEWAY_SAF_COMPACT_BYTES", 4096)
    path = tmp_path / "saf.jsonl"
    queue = ReversalQueue(path)
    queue.open()
    host = _Confirming(stuck="999999")  # answered `unavailable` every time
    await queue.add(_owed("999999"))
    for i in range(1, 400):
        await queue.add(_owed(f"{i:06d}"))
        await queue.deliver(host)
    assert [r.stan for r in queue.pending.values()] == ["999999"]
    assert path.stat().st_size < 2 * 4096
    await queue.close()


async def test_a_call_to_the_http_host_that_does_not_fit_its_queue_sends_none_of_it() -> None:
    host = HttpHost(["http://127.0.0.1:9"], queue_max=4)
    host._start = lambda: None  # type: ignore[method-assign]  # no sender: the queue stays
    with pytest.raises(HostUnavailable, match="too many"):
        await host.pos([_owed(f"{i:06d}") for i in range(1, 7)])
    assert host._queue.qsize() == 0


def _forging_terminal(code: str) -> PosTerminal:
    """A reference terminal whose replies come from an on-path forger: `code`, no F64."""
    t = PosTerminal("unused", 0, TID, MID, TMK, KeyMode.AES)
    t.keys = security.WorkingKeys(pik=bytes(16), mak=bytes(16))
    sent: dict[str, Any] = {}

    async def send_raw(frame: bytes) -> None:
        sent["f"] = codec.decode(
            frame[codec.LENGTH_BYTES + codec.TPDU_BYTES + codec.HEADER_BYTES :]
        )

    async def read_reply() -> Any:
        f = sent["f"]
        forged = {"t": "0210", "3": f["3"], "4": f["4"], "11": f["11"], "39": code,
                  "41": f["41"], "42": f["42"], "60": f["60"]}  # fmt: skip
        body = codec.encode(forged)
        return Reply(
            codec.decode(body), 0, codec.pack_frame(b"\x60\x00\x00\x00\x01", bytes(6), body)
        )

    t.send_raw, t.read_reply = send_raw, read_reply  # type: ignore[method-assign]
    return t


@pytest.mark.parametrize("code", ["51", "00", "96"])
async def test_an_unmacd_reply_never_settles_what_the_terminal_owes(code: str) -> None:
    """A decline or approval without F64 (a code the gateway only sends MAC'd) is taken as a
    MAC that failed; an unMAC'd 96 is taken as no reply. Either way the terminal keeps its
    reversal: a forger cannot make it forget money that may have been taken."""
    t = _forging_terminal(code)
    if code == "96":
        assert (await t.purchase(PAN, 100)).code == "96"
    else:
        with pytest.raises(TerminalError, match="without a MAC"):
            await t.purchase(PAN, 100)
    assert t.pending_reversal is not None
    assert PAN not in repr(t)


# --- what only the terminal itself may do (second security review) --------------------------


async def test_a_sign_on_by_anyone_else_never_takes_the_terminals_keys_away(
    tmp_path: Path,
) -> None:
    """A stranger signs on under the terminal's id (it cannot read the keys): the terminal
    goes on under its keys. When the terminal itself signs on, its first request under the
    new keys retires the old ones."""
    processor, _host, t = await _gateway(tmp_path)
    old = t.keys
    stranger = await processor.handle(codec.encode(t._base("0800", None, "00", "005")))
    assert stranger is not None and _code(stranger) == "00"
    assert _code(await processor.handle(_purchase(t))) == "00"  # under the old keys
    new = security.read_working_keys(KeyMode.AES, TMK, bytes.fromhex(codec.decode(
        stranger.body)["62"]))  # fmt: skip
    t.keys = new  # the terminal's own sign-on, say: its first request takes the new keys
    assert _code(await processor.handle(_purchase(t))) == "00"
    t.keys = old
    assert _code(await processor.handle(_purchase(t))) == "A0"  # retired


@pytest.mark.parametrize("mti", ["0820", "0500", "0320"])
async def test_a_sign_off_settlement_or_upload_without_the_terminals_mac_does_nothing(
    tmp_path: Path, mti: str
) -> None:
    """Anyone may know a terminal's id: a sign-off, a settlement or a batch upload without a
    MAC under its keys (missing or wrong) is A0, reaches no host and ends nothing."""
    processor, host, t = await _gateway(tmp_path)
    net = {"0820": "002", "0500": "201", "0320": "202"}[mti]
    fields = t._base(mti, None, "00", net)
    if mti != "0820":
        fields["48"] = codec.format_totals(codec.Totals(0, 0, 0, 0), "0")
    wrong = replace(t, keys=security.WorkingKeys(pik=bytes(16), mak=bytes(16)))
    for body in (codec.encode(fields), wrong.encode(fields, mac=True)):
        reply = await processor.handle(body)
        assert reply is not None and _code(reply) == "A0"
        assert "64" not in codec.decode(reply.body)
    assert host.seen == []
    assert _code(await processor.handle(_purchase(t))) == "00"  # still signed on
    good = await processor.handle(t.encode(fields, mac=True))
    assert good is not None and _code(good) == "00" and "64" in codec.decode(good.body)


def _scripted_terminal(codes: list[str]) -> tuple[PosTerminal, list[dict[str, str]]]:
    """A reference terminal whose replies are `codes` in turn (00 MAC'd under its keys);
    the requests it sent, decoded, in the list."""
    t = PosTerminal("unused", 0, TID, MID, TMK, KeyMode.AES)
    t.keys = security.WorkingKeys(pik=bytes(16), mak=bytes(16))
    sent: list[dict[str, str]] = []
    skip = codec.LENGTH_BYTES + codec.TPDU_BYTES + codec.HEADER_BYTES

    async def send_raw(frame: bytes) -> None:
        sent.append(codec.decode(frame[skip:]))

    async def read_reply() -> Any:
        f, code = sent[-1], codes.pop(0)
        reply = {"t": codec.response_mti(f["t"]), "3": f["3"], "4": f["4"], "11": f["11"],
                 "39": code, "41": f["41"], "42": f["42"], "60": f["60"]}  # fmt: skip
        body = codec.encode(reply)
        if code == "00":
            body = t.encode(reply, mac=True)
        frame = codec.pack_frame(b"\x60\x00\x00\x00\x01", bytes(6), body)
        return Reply(codec.decode(body), 0, frame)

    t.send_raw, t.read_reply = send_raw, read_reply  # type: ignore[method-assign]
    return t, sent


async def test_a_top_up_confirmation_without_a_final_answer_is_sent_again_with_its_stan() -> None:
    """The cash is in the drawer: a 0220 answered 96 is owed, sent again with the same STAN
    before the next request, until 00; and never reversed."""
    t, sent = _scripted_terminal(["00", "96", "00", "00"])
    assert (await t.topup(PAN, 5_000)).code == "00"
    hold_stan = sent[-1]["11"]
    assert (await t.topup_confirm(hold_stan, 5_000)).code == "96"
    assert t.pending_confirmation is not None and t.pending_reversal is None
    confirm_stan = sent[-1]["11"]
    assert (await t.purchase(PAN, 100)).code == "00"
    assert [(f["t"], f["11"]) for f in sent[-2:]] == [("0220", confirm_stan), ("0200", t.stan)]
    assert _confirmation_owed(t) is None  # (a call: mypy narrowed the attribute above)
    assert [x.kind for x in t.lines][-2:] == ["topup_confirm", "purchase"]


async def test_an_owed_confirmation_goes_in_the_current_batch_and_blocks_settling() -> None:
    """A sign-on moved the batch after a 96 to the confirmation: it is sent again in the new
    batch (a 77 for the old one would keep it owed for ever); no settlement before it."""
    t, sent = _scripted_terminal(["00", "96", "00"])
    assert (await t.topup(PAN, 5_000)).code == "00"
    assert (await t.topup_confirm(sent[-1]["11"], 5_000)).code == "96"
    with pytest.raises(TerminalError, match="still owed"):
        await t.settle()
    t.batch = "000002"
    assert (await t.send_pending_confirmation()).code == "00"
    assert codec.parse_f60(sent[-1]["60"]).batch == "000002"
    assert _confirmation_owed(t) is None


def _confirmation_owed(t: PosTerminal) -> dict[str, str] | None:
    return t.pending_confirmation


def _wired(t: PosTerminal, processor: Processor) -> None:
    """The reference terminal's line straight into an in-memory processor."""
    box: dict[str, bytes] = {}
    skip = codec.LENGTH_BYTES + codec.TPDU_BYTES + codec.HEADER_BYTES

    async def send_raw(frame: bytes) -> None:
        box["body"] = frame[skip:]

    async def read_reply() -> Reply:
        reply = await processor.handle(box["body"])
        assert reply is not None
        frame = codec.pack_frame(b"\x60\x00\x00\x00\x01", bytes(6), reply.body)
        return Reply(codec.decode(reply.body), 0, frame)

    t.send_raw, t.read_reply = send_raw, read_reply  # type: ignore[method-assign]


@pytest.mark.parametrize("why", ["restart", "mac_errors"])
async def test_a_sign_off_the_gateway_has_no_keys_for_is_00_and_the_terminal_takes_it(
    tmp_path: Path, why: str
) -> None:
    """The gateway restarted, or dropped the keys after MAC errors: the terminal's MAC'd
    sign-off is answered 00 without F64 (nothing to end), and the terminal forgets its keys."""
    processor, _host, t = await _gateway(tmp_path)
    if why == "restart":
        saf = ReversalQueue(tmp_path / "again.jsonl")
        saf.open()
        processor = Processor(Host(), saf, KEK, Metrics())
    else:
        wrong = replace(t, keys=security.WorkingKeys(pik=bytes(16), mak=bytes(16)))
        for _ in range(limits.GATEWAY_MAC_FAILURES_MAX):
            assert _code(await processor.handle(_purchase(wrong))) == "A0"
    _wired(t, processor)
    reply = await t.sign_off()
    assert reply.code == "00" and "64" not in reply.fields and t.keys is None


async def test_a_strangers_sign_on_right_after_the_terminals_own_does_not_stop_it(
    tmp_path: Path,
) -> None:
    """The terminal signs on again; before its first request under the new keys a stranger
    signs on too: the terminal's new keys still verify (and reset the MAC error count)."""
    processor, _host, t = await _gateway(tmp_path)
    wrong = replace(t, keys=security.WorkingKeys(pik=bytes(16), mak=bytes(16)))
    for _ in range(limits.GATEWAY_MAC_FAILURES_MAX - 1):
        assert _code(await processor.handle(_purchase(wrong))) == "A0"
    own = await processor.handle(codec.encode(t._base("0800", None, "00", "005")))
    assert own is not None and _code(own) == "00"
    t.keys = security.read_working_keys(
        KeyMode.AES, TMK, bytes.fromhex(codec.decode(own.body)["62"])
    )
    stranger = await processor.handle(codec.encode(t._base("0800", None, "00", "005")))
    assert stranger is not None and _code(stranger) == "00"
    assert _code(await processor.handle(_purchase(t))) == "00"
    assert processor.sessions[TID].mac_failures == 0
