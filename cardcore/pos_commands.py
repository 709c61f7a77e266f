"""The POS-side commands: `cardcore gateway`, `cardcore pos`, `cardcore terminal add`,
`cardcore card issue`, `cardcore keys init`.

`terminal add` and `card issue` ask a running host (`cardcore serve` or `cardcore ledger`)
over its internal API; `pos` is a terminal that keeps its STAN, batch, batch lines and any
reversal it owes in a small state file between runs, as a real terminal keeps them in its
memory, and signs on at the start of every run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from cardcore import demo, limits
from cardcore.admin_commands import print_file
from cardcore.cards.model import mask_pan
from cardcore.config import Config, ConfigError, create_kek_file, load_kek
from cardcore.frontend_gateway import codec
from cardcore.frontend_gateway.app import start_gateway, tls_context
from cardcore.frontend_gateway.host import HttpHost
from cardcore.frontend_gateway.security import (
    PIN_DIGITS_MAX,
    PIN_DIGITS_MIN,
    KeyMode,
    SecurityError,
)
from cardcore.frontend_gateway.terminal import PosTerminal, Reply, TerminalError, describe
from cardcore.metrics import Metrics
from cardcore.runtime import settle_gc
from cardcore.vault import kek_check_value

log = logging.getLogger(__name__)


class CommandError(Exception):
    """A command that cannot run as asked: one line on stderr, exit 2."""


# --- keys init -------------------------------------------------------------------------------


def keys_init(config: Config, path: str | None) -> dict[str, object]:
    target = path or config.kek_file or "data/kek"
    created = create_kek_file(target)
    return {"path": target, "created": created}


# --- gateway ---------------------------------------------------------------------------------


async def run_gateway(config: Config) -> None:
    from cardcore.api.server import stop_on_signals  # noqa: PLC0415 - aiohttp app on demand

    stop = stop_on_signals()  # first: a signal during start-up still stops us cleanly
    kek = load_kek(config)
    if kek is None:
        raise ConfigError("the gateway needs the key-encrypting key (CARDCORE_KEK or kek_file)")
    urls = [u.strip() for u in config.gateway_ledger_urls.split(",") if u.strip()]
    if not urls:
        raise ConfigError("gateway_ledger_urls names no ledger")
    tls_context(config)  # its files refused before the ledger is asked anything
    host = HttpHost(urls, token=config.internal_token)
    theirs = await host.kek_check_value()
    if theirs is not None and theirs != kek_check_value(kek):
        raise ConfigError(
            f"the gateway's key-encrypting key is not the ledger's (check values "
            f"{kek_check_value(kek)} and {theirs}): terminals could not sign on"
        )
    metrics = Metrics()
    gateway = await start_gateway(config, kek, host, metrics)
    if theirs is None:  # it serves with the ledger away all the same (96, store and forward)
        log.warning("the ledger did not give its key's check value: the keys were not compared")
    metrics_http = None
    if config.gateway_metrics_port:
        from cardcore.api.app import metrics_app  # noqa: PLC0415
        from cardcore.api.listener import HttpListener  # noqa: PLC0415

        metrics_http = HttpListener(metrics_app(metrics))
        await metrics_http.start(config.host, config.gateway_metrics_port)
    ready = {
        "event": "listening",
        "role": "gateway",
        "gateway": f"{config.gateway_host}:{gateway.port}",
        "ledgers": urls,
    }
    settle_gc()
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await gateway.close()
        if metrics_http is not None:
            await metrics_http.close()


# --- terminal add, card issue ----------------------------------------------------------------


async def host_post(
    config: Config, url: str | None, path: str, body: dict[str, Any], answer_key: str
) -> dict[str, Any]:
    """POST to the host's internal API; its JSON object answer, which must hold
    `answer_key`. Anything else (a proxy's HTML page, no answer in time) is one error line,
    not a traceback."""
    base = (url or f"http://{config.host}:{config.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {config.internal_token}"} if config.internal_token else {}
    seconds = limits.HTTP_CLIENT_TIMEOUT_S * 10
    timeout = aiohttp.ClientTimeout(total=seconds)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(base + path, json=body, headers=headers) as response,
        ):
            try:
                document = await response.json(content_type=None)
            except ValueError:
                document = None
            status, kind = response.status, response.content_type
    except aiohttp.ClientError as exc:
        raise CommandError(f"cannot reach the host at {base}: {exc}") from None
    except TimeoutError:
        raise CommandError(f"{base}{path}: no answer within {seconds} s") from None
    if not isinstance(document, dict):
        raise CommandError(f"{base}{path}: {status}, not a cardcore answer ({kind})")
    if status >= 300:
        error = document.get("error")
        error = error if isinstance(error, dict) else {}
        raise CommandError(f"{base}{path}: {status} {error.get('code')}: {error.get('message')}")
    if answer_key not in document:
        raise CommandError(f"{base}{path}: {status}, an answer without {answer_key!r}")
    return document


# --- pos -------------------------------------------------------------------------------------

Show = Callable[[str, Reply], None]
Step = Callable[[PosTerminal, Show], Awaitable[Reply | None]]
ReversalCopy = dict[str, str]


def _state_path(args: Any) -> Path:
    return Path(args.state or f"data/pos-{args.tid}.json")


def _load_state(terminal: PosTerminal, path: Path) -> list[ReversalCopy]:
    """Restore the terminal's memory; the reversal copies of this batch's requests."""
    if not path.exists():
        return []
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        for name in ("stan", "batch"):
            _check_six_digits(name, state[name])
        terminal.stan = state["stan"]
        terminal.batch = state["batch"]
        reversal = state.get("pending_reversal")
        if reversal is not None:
            _check_copy(reversal)
        terminal.pending_reversal = reversal
        confirmation = state.get("pending_confirmation")
        if confirmation is not None:
            _check_copy(confirmation, "0220")
        terminal.pending_confirmation = confirmation
        terminal.restore_lines(state.get("lines", []))
        requests = state.get("requests", [])
        for copy in requests:
            _check_copy(copy)
    except (ValueError, KeyError, TypeError, codec.FormatError) as exc:
        raise CommandError(f"terminal state file {path} is damaged: {exc}") from None
    terminal.last_request = requests[-1] if requests else None
    return list(requests)


def _check_six_digits(name: str, value: Any) -> None:
    """A STAN or batch as the state file keeps it, or a ValueError (the file is damaged)."""
    if not (isinstance(value, str) and len(value) == 6 and value.isdigit()):
        raise ValueError(f"{name} is not six digits")


def _check_copy(copy: Any, mti: str = "0400") -> None:
    """A reversal copy (or a confirmation owed) as the state file keeps it, or a ValueError
    (the file is damaged)."""
    if not isinstance(copy, dict) or copy.get("t") != mti:
        raise ValueError(f"a kept request is not a {mti}")
    if not all(isinstance(v, str) for v in copy.values()) or "11" not in copy:
        raise ValueError("a kept request is not text with a STAN")
    codec.parse_f60(copy["60"])


def _save_state(terminal: PosTerminal, path: Path, requests: list[ReversalCopy]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "stan": terminal.stan,
        "batch": terminal.batch,
        "pending_reversal": terminal.pending_reversal,
        "pending_confirmation": terminal.pending_confirmation,
        "lines": [asdict(x) for x in terminal.lines],
        "requests": requests,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    tmp.replace(path)


def _keep_state(terminal: PosTerminal, path: Path, requests: list[ReversalCopy]) -> None:
    """After the exchange: the state saved, or a warning on stderr (the reply still counts;
    the file was written before anything was sent, so this is a disk that failed since)."""
    try:
        _save_state(terminal, path, requests)
    except OSError as exc:
        sys.stderr.write(
            f"cardcore: warning: --state {path}: cannot be written ({exc.strerror}): the "
            "terminal's STAN and owed reversals are not kept\n"
        )


def _remembered(terminal: PosTerminal, requests: list[ReversalCopy]) -> list[ReversalCopy]:
    """The requests to keep: those of the terminal's batch, this run's last one added."""
    kept = list(requests)
    last = terminal.last_request
    if last is not None and (not kept or kept[-1] != last):
        kept.append(last)
    kept = [x for x in kept if codec.parse_f60(x["60"]).batch == terminal.batch]
    return kept[-limits.POS_STATE_REQUESTS_MAX :]


def frame_text(frame: bytes) -> str:
    """A frame in hex for --raw: the card number masked, a PIN block and keys starred."""
    text = frame.hex().upper()
    try:
        fields = codec.decode(codec.split_frame(frame[codec.LENGTH_BYTES :]).body)
    except (codec.FormatError, codec.FrameError, ValueError):
        return f"({len(frame)} bytes that do not decode)"
    for name in ("35", "52", "62"):  # track 2, the PIN block, the working keys
        if name in fields:
            secret = fields[name].upper().replace("=", "D")
            text = text.replace(secret, "*" * len(secret))
    if "2" in fields:
        text = text.replace(fields["2"], mask_pan(fields["2"]))
    return text


async def run_pos(config: Config, args: Any) -> int:
    """One terminal session: sign on, send any reversal owed, do `args.action`, print."""
    host, _, port = (args.gateway or f"{config.gateway_host}:{config.gateway_port}").rpartition(":")
    if not (port.isdigit() and 1 <= int(port) <= 65_535):
        raise CommandError("--gateway is HOST:PORT, the port 1..65535")
    try:
        tmk = bytes.fromhex(args.tmk) if args.tmk else demo.DEMO_TMK
    except ValueError:
        raise CommandError("--tmk is 32 hexadecimal digits") from None
    out = sys.stdout
    if args.action == "script":
        return 0 if await demo.pos_session(host, int(port), out) else 1
    terminal = PosTerminal(host, int(port), args.tid, args.mid, tmk, KeyMode(args.key_mode))
    path = _state_path(args)
    requests = _load_state(terminal, path)
    step = plan(args, requests, path)  # every option checked before anything is sent
    try:  # and the state file written, as it will be after: a STAN is never sent twice
        _save_state(terminal, path, requests)
    except OSError as exc:
        raise CommandError(f"--state {path}: cannot be written: {exc.strerror}") from None

    def show(what: str, reply: Reply) -> None:
        out.write(f"{what:<14} {describe(reply)}\n")
        if args.raw:
            out.write(f"{'':<14} sent     {frame_text(terminal.last_sent)}\n")
            out.write(f"{'':<14} received {frame_text(reply.raw)}\n")

    try:
        batch_before = terminal.batch
        signed = await terminal.sign_on()
        show("sign-on", signed)
        if signed.code != "00":
            return 1
        if terminal.batch != batch_before:
            terminal.lines.clear()  # the host closed that batch: a new one begins
        if terminal.pending_reversal is not None:
            show("reversal", await terminal.send_pending_reversal())
        if terminal.pending_confirmation is not None:
            show("confirmation", await terminal.send_pending_confirmation())
        reply = await step(terminal, show)
    except (TerminalError, SecurityError) as exc:
        raise CommandError(f"terminal: {exc}") from None
    except OSError as exc:
        raise CommandError(f"cannot reach the gateway at {host}:{port}: {exc}") from None
    except ValueError as exc:  # a value the message layout cannot carry: nothing was sent
        raise CommandError(f"{args.action}: {exc}") from None
    finally:
        _keep_state(terminal, path, _remembered(terminal, requests))
        await terminal.close()
    if reply is None:
        return 0
    show(args.action, reply)
    return 0 if reply.code == "00" else 1


class _Options:
    """The options of one action, each checked as it is read (missing or bad: exit 2). An
    error names the option, never its value: it may be a card number or a PIN."""

    def __init__(self, args: Any) -> None:
        self.args = args

    def _given(self, name: str) -> Any:
        value = getattr(self.args, name)
        if value in (None, ""):
            raise CommandError(f"{self.args.action} needs {_flag(name)}")
        return value

    def card(self) -> str:
        value = str(self._given("card"))
        if not (_digits(value) and codec.PAN_DIGITS_MIN <= len(value) <= codec.PAN_DIGITS_MAX):
            raise CommandError(
                f"--card must be {codec.PAN_DIGITS_MIN} to {codec.PAN_DIGITS_MAX} digits"
            )
        return value

    def maybe_card(self) -> str | None:
        return self.card() if self.args.card else None

    def pin(self) -> str:
        value = str(self._given("pin"))
        if not (_digits(value) and PIN_DIGITS_MIN <= len(value) <= PIN_DIGITS_MAX):
            raise CommandError(f"--pin must be {PIN_DIGITS_MIN} to {PIN_DIGITS_MAX} digits")
        return value

    def maybe_pin(self) -> str | None:
        return None if self.args.pin is None else self.pin()

    def number(self, name: str, low: int, high: int) -> int:
        value = int(self._given(name))
        if not low <= value <= high:
            raise CommandError(f"{_flag(name)} must be {low}..{high}")
        return value

    def fen(self, name: str = "amount") -> int:
        return self.number(name, 0, limits.POS_AMOUNT_MAX)

    def trace(self, name: str) -> str:
        """A STAN or a batch number: 1 to 6 digits, not all zero; sent as 6."""
        value = str(self._given(name))
        if not (_digits(value) and len(value) <= STAN_DIGITS and int(value) > 0):
            raise CommandError(f"{_flag(name)} must be 1 to {STAN_DIGITS} digits, not all zero")
        return value.zfill(STAN_DIGITS)

    def rrn(self) -> str:
        value = str(self._given("rrn"))
        if not (len(value) == RRN_CHARS and value.isascii() and value.isalnum()):
            raise CommandError(f"--rrn must be {RRN_CHARS} letters or digits (F37 of the reply)")
        return value

    def maybe_trace(self, name: str) -> str:
        return self.trace(name) if getattr(self.args, name) else ""

    def text(self, name: str) -> str:
        value = str(self._given(name))
        if not (value.isascii() and value.isprintable()):
            raise CommandError(f"{_flag(name)} must be printable ASCII")
        return value

    def maybe_text(self, name: str) -> str:
        return self.text(name) if getattr(self.args, name) else ""


STAN_DIGITS = 6
RRN_CHARS = 12


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


def plan(args: Any, requests: list[ReversalCopy], path: Path) -> Step:
    """What `args.action` does once signed on, its options checked now (a CommandError)."""
    for name, pattern in (("tid", _TID), ("mid", _MID)):
        if not pattern.fullmatch(getattr(args, name)):
            raise CommandError(f"--{name} must be {pattern.pattern}")
    return _plan_card(args, _Options(args)) or _plan_loyalty(args, _Options(args), requests, path)


_TID, _MID = re.compile(r"[A-Za-z0-9]{8}"), re.compile(r"[A-Za-z0-9]{15}")  # F41, F42
# A coupon's text and a sale number as F48 carries them (docs/card-protocol.md section 6):
# each item is its tag (2) and length (3) and its text, all within F48's length.
_TLV_ITEM_HEAD = 5
_F48_CHARS_MAX = codec.LAYOUT["48"].max_len
_SALE = re.compile(rf"[A-Za-z0-9_.-]{{1,{limits.POS_SALE_CHARS_MAX}}}")


def _plan_card(args: Any, o: _Options) -> Step | None:
    """The card messages of sections 5.2 to 5.13: None for an action that is not one."""
    action = args.action
    if action == "sign-on":
        return _nothing
    if action == "echo":
        return lambda t, _: t.echo()
    if action == "sign-off":
        return lambda t, _: t.sign_off()
    if action == "inquiry":
        card, pin = o.card(), o.maybe_pin()
        return lambda t, _: t.inquiry(card, pin)
    if action == "purchase":
        card, amount, pin = o.card(), o.fen(), o.maybe_pin()
        return lambda t, _: t.purchase(card, amount, pin)
    if action == "void":
        card, amount, stan = o.card(), o.fen(), o.trace("original_stan")
        return lambda t, _: t.void(card, amount, stan)
    if action == "refund":
        card, amount, rrn = o.card(), o.fen(), o.rrn()
        batch, stan = o.trace("original_batch"), o.trace("original_stan")
        return lambda t, _: t.refund(card, amount, rrn, batch, stan)
    if action == "topup":
        card, amount = o.card(), o.fen()

        async def topup(t: PosTerminal, _: Show) -> Reply:
            reply = await t.topup(card, amount)
            if reply.code != "00":
                return reply
            return await t.topup_confirm(reply.fields["11"], amount)

        return topup
    if action == "settle":
        return _settle
    return None


def _plan_loyalty(args: Any, o: _Options, requests: list[ReversalCopy], path: Path) -> Step:
    """The points, coupon, service and manager messages (section 5.11) and `reverse`."""
    action = args.action
    if action == "points-earn":
        card, amount = o.card(), o.fen()
        return lambda t, _: t.points_earn(card, amount)
    if action == "points-redeem":
        card, pin = o.card(), o.maybe_pin()
        points = o.number("points", 1, limits.POINTS_PER_TXN_MAX)
        return lambda t, _: t.points_redeem(card, points, pin)
    if action == "points-return":
        card, amount, rrn = o.card(), o.fen(), o.rrn()
        return lambda t, _: t.points_return(card, amount, rrn)
    if action in COUPON_CODES:
        pcode, code, bill = COUPON_CODES[action], o.text("coupon"), o.fen()
        member, sale = o.maybe_card(), o.maybe_text("sale")
        if sale and not _SALE.fullmatch(sale):
            raise CommandError(f"--sale must be {_SALE.pattern}")
        room = _F48_CHARS_MAX - _TLV_ITEM_HEAD - (_TLV_ITEM_HEAD + len(sale) if sale else 0)
        most = min(limits.COUPON_QR_CHARS_MAX, room)
        if len(code) > most:
            beside = " beside this --sale" if sale else ""
            raise CommandError(f"--coupon is 1 to {most} characters{beside}")
        held = o.maybe_trace("original_stan") if action == "coupon-redeem" else ""
        return lambda t, _: t.coupon(pcode, code, bill, member, sale=sale, stan=held)
    if action == "coupon-reverse":
        stan, code = o.trace("original_stan"), o.maybe_text("coupon")
        return lambda t, _: t.coupon_reverse(stan, code or None)
    if action == "service-redeem":
        card, product = o.card(), o.maybe_text("product")
        uses = o.number("uses", 1, limits.SERVICE_USES_MAX) if args.uses is not None else 1
        return lambda t, _: t.service_redeem(card, uses, product)
    if action == "manager-auth":
        manager, manager_pin, bill = o.card(), o.pin(), o.fen()
        discount = o.number("discount", 1, limits.POS_AMOUNT_MAX)
        reason = o.text("reason")
        return lambda t, _: t.manager_auth(manager, manager_pin, bill, discount, reason)
    if action == "reverse":
        original = _original(o, requests, path)
        return lambda t, _: t.reverse(original)
    raise CommandError(f"unknown action {action}")


COUPON_CODES = {"coupon-query": "920000", "coupon-reserve": "950000", "coupon-redeem": "930000"}


def _original(o: _Options, requests: list[ReversalCopy], path: Path) -> ReversalCopy:
    """The reversal copy `reverse` sends: the last request's, or --original-stan's."""
    if not o.args.original_stan:
        if not requests:
            raise CommandError(f"reverse: no financial request of this batch in {path}")
        return requests[-1]
    stan = o.trace("original_stan")
    for copy in reversed(requests):
        if copy["11"] == stan:
            return copy
    raise CommandError(f"reverse: no request with STAN {stan} of this batch in {path}")


async def _nothing(_t: PosTerminal, _show: Show) -> None:
    return None


async def _settle(t: PosTerminal, show: Show) -> Reply:
    reply = await t.settle()
    if reply.code == "00" and reply.fields["48"][30] != "1":
        show("settle", reply)
        replies = await t.upload()
        return replies[-1]
    return reply


async def issue_cards(config: Config, args: Any) -> int:
    body = {
        "legal_entity": args.legal_entity,
        "count": args.count,
        "balance": args.balance,
        "balance_max": args.balance_max,
        "expires": args.expires,
    }
    if not args.out:
        answer = await host_post(config, args.url, "/internal/v1/cards", body, "cards")
        print(json.dumps({"issued": len(answer["cards"]), "cards": answer["cards"]}))
        return 0
    with contextlib.ExitStack() as files:
        # the file first: full numbers are shown once, never issued into a lost file
        handle = print_file(files, args.out)
        answer = await host_post(config, args.url, "/internal/v1/cards", body, "cards")
        cards = answer["cards"]
        handle.write("card_number,account_id\n")
        handle.writelines(f"{c['pan']},{c['account_id']}\n" for c in cards)
    print(json.dumps({"issued": len(cards), "out": args.out}))
    return 0
