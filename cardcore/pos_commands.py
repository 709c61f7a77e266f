"""The POS-side commands: `cardcore gateway`, `cardcore pos`, `cardcore terminal add`,
`cardcore card issue`, `cardcore keys init`.

`terminal add` and `card issue` ask a running host (`cardcore serve` or `cardcore ledger`)
over its internal API; `pos` is a terminal that keeps its STAN, batch, batch lines and any
reversal it owes in a small state file between runs, as a real terminal keeps them in its
memory, and signs on at the start of every run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from cardcore import demo, limits
from cardcore.config import Config, ConfigError, create_kek_file, load_kek
from cardcore.frontend_gateway.app import start_gateway
from cardcore.frontend_gateway.host import HttpHost
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.terminal import PosTerminal, Reply, TerminalError, describe
from cardcore.metrics import Metrics
from cardcore.runtime import settle_gc

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
    metrics = Metrics()
    gateway = await start_gateway(config, kek, HttpHost(urls, token=config.internal_token), metrics)
    metrics_runner = None
    if config.gateway_metrics_port:
        from cardcore.api.app import metrics_app  # noqa: PLC0415

        metrics_runner = aiohttp.web.AppRunner(metrics_app(metrics), access_log=None)
        await metrics_runner.setup()
        await aiohttp.web.TCPSite(
            metrics_runner, config.host, config.gateway_metrics_port, reuse_address=True
        ).start()
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
        if metrics_runner is not None:
            await metrics_runner.cleanup()


# --- terminal add, card issue ----------------------------------------------------------------


async def host_post(config: Config, url: str | None, path: str, body: dict[str, Any]) -> Any:
    base = (url or f"http://{config.host}:{config.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {config.internal_token}"} if config.internal_token else {}
    timeout = aiohttp.ClientTimeout(total=limits.HTTP_CLIENT_TIMEOUT_S * 10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(base + path, json=body, headers=headers) as response,
        ):
            document = await response.json(content_type=None)
            if response.status >= 300:
                error = document.get("error", {}) if isinstance(document, dict) else {}
                raise CommandError(
                    f"{base}{path}: {response.status} {error.get('code')}: {error.get('message')}"
                )
            return document
    except aiohttp.ClientError as exc:
        raise CommandError(f"cannot reach the host at {base}: {exc}") from None


# --- pos -------------------------------------------------------------------------------------


def _state_path(args: Any) -> Path:
    return Path(args.state or f"data/pos-{args.tid}.json")


def _load_state(terminal: PosTerminal, path: Path) -> None:
    if not path.exists():
        return
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        terminal.stan = state["stan"]
        terminal.batch = state["batch"]
        terminal.pending_reversal = state.get("pending_reversal")
        terminal.restore_lines(state.get("lines", []))
    except (ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"terminal state file {path} is damaged: {exc}") from None


def _save_state(terminal: PosTerminal, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "stan": terminal.stan,
        "batch": terminal.batch,
        "pending_reversal": terminal.pending_reversal,
        "lines": [asdict(x) for x in terminal.lines],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    tmp.replace(path)


async def run_pos(config: Config, args: Any) -> int:
    """One terminal session: sign on, send any reversal owed, do `args.action`, print."""
    host, _, port = (args.gateway or f"{config.gateway_host}:{config.gateway_port}").rpartition(":")
    if not port.isdigit():
        raise CommandError("--gateway is HOST:PORT")
    try:
        tmk = bytes.fromhex(args.tmk) if args.tmk else demo.DEMO_TMK
    except ValueError:
        raise CommandError("--tmk is 32 hexadecimal digits") from None
    terminal = PosTerminal(host, int(port), args.tid, args.mid, tmk, KeyMode(args.key_mode))
    path = _state_path(args)
    _load_state(terminal, path)
    out = sys.stdout

    def show(what: str, reply: Reply) -> None:
        out.write(f"{what:<14} {describe(reply)}\n")
        if args.raw:
            out.write(f"{'':<14} sent     {terminal.last_sent.hex().upper()}\n")
            out.write(f"{'':<14} received {reply.raw.hex().upper()}\n")

    try:
        if args.action == "script":
            await demo.pos_session(host, int(port), out)
            return 0
        batch_before = terminal.batch
        signed = await terminal.sign_on()
        show("sign-on", signed)
        if signed.code != "00":
            return 1
        if terminal.batch != batch_before:
            terminal.lines.clear()  # the host closed that batch: a new one begins
        if terminal.pending_reversal is not None:
            show("reversal", await terminal.send_pending_reversal())
        reply = await _pos_action(terminal, args)
    except TerminalError as exc:
        raise CommandError(f"terminal: {exc}") from None
    except OSError as exc:
        raise CommandError(f"cannot reach the gateway at {host}:{port}: {exc}") from None
    finally:
        _save_state(terminal, path)
        await terminal.close()
    if reply is None:
        return 0
    show(args.action, reply)
    return 0 if reply.code == "00" else 1


async def _pos_action(terminal: PosTerminal, args: Any) -> Reply | None:
    def need(name: str) -> Any:
        value = getattr(args, name)
        if value in (None, ""):
            raise CommandError(f"{args.action} needs --{name.replace('_', '-')}")
        return value

    action = args.action
    if action == "sign-on":
        return None
    if action == "echo":
        return await terminal.echo()
    if action == "sign-off":
        return await terminal.sign_off()
    if action == "inquiry":
        return await terminal.inquiry(need("card"), args.pin)
    if action == "purchase":
        return await terminal.purchase(need("card"), need("amount"), args.pin)
    if action == "void":
        return await terminal.void(need("card"), need("amount"), need("original_stan"))
    if action == "refund":
        return await terminal.refund(
            need("card"), need("amount"), need("rrn"), need("original_batch"), need("original_stan")
        )
    if action == "topup":
        reply = await terminal.topup(need("card"), need("amount"))
        if reply.code != "00":
            return reply
        return await terminal.topup_confirm(reply.fields["11"], args.amount)
    if action == "settle":
        reply = await terminal.settle()
        if reply.code == "00" and reply.fields["48"][30] != "1":
            sys.stdout.write(f"{'settle':<14} {describe(reply)}\n")
            replies = await terminal.upload()
            return replies[-1]
        return reply
    raise CommandError(f"unknown action {action}")


async def issue_cards(config: Config, args: Any) -> int:
    body = {
        "legal_entity": args.legal_entity,
        "count": args.count,
        "balance": args.balance,
        "balance_max": args.balance_max,
        "expires": args.expires,
    }
    answer = await host_post(config, args.url, "/internal/v1/cards", body)
    cards = answer["cards"]
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(f"{c['pan']},{c['account_id']}\n" for c in cards)
        await asyncio.to_thread(_write_private, path, "card_number,account_id\n" + lines)
        print(json.dumps({"issued": len(cards), "out": str(path)}))
    else:
        print(json.dumps({"issued": len(cards), "cards": cards}))
    return 0


def _write_private(path: Path, text: str) -> None:
    """Full card numbers: readable by the owner only (mode 0600), never by the group."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)
