"""Run the HTTP service (and, with a key-encrypting key, the POS host and the terminal
gateway) until SIGINT or SIGTERM, then shut down in order: gateway, HTTP, ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys

from cardcore import demo, migrate
from cardcore.api.app import build_app
from cardcore.api.listener import HttpListener
from cardcore.cards.accounts import Accounts
from cardcore.cards.directory import Directory
from cardcore.cards.pins import Pins
from cardcore.cards.pos import PosService, token_key_of
from cardcore.config import Config, ConfigError, create_kek_file, load_kek
from cardcore.frontend_gateway import security
from cardcore.frontend_gateway.app import RunningGateway, start_gateway
from cardcore.frontend_gateway.host import InProcessHost
from cardcore.ledger.service import Ledger
from cardcore.metrics import Metrics
from cardcore.records import Records
from cardcore.runtime import settle_gc
from cardcore.vault import Vault

log = logging.getLogger(__name__)

DEMO_KEK_FILE = "data/kek"


async def serve(config: Config, *, role: str, with_demo: bool) -> None:
    stop = stop_on_signals()  # first: a signal during start-up still stops us cleanly
    if with_demo and not (config.kek or config.kek_file):
        if create_kek_file(DEMO_KEK_FILE):
            log.warning("created a demo key-encrypting key", extra={"path": DEMO_KEK_FILE})
        config = config.with_overrides({"kek_file": DEMO_KEK_FILE})
    kek = load_kek(config)
    if kek is not None:
        await migrate.check_kek(config.db_url, kek)  # the database's own, or nothing starts
    metrics = Metrics()
    ledger = Ledger.open(
        config.db_url,
        metrics,
        batch_size_max=config.batch_size_max,
        batch_wait_ms_max=config.batch_wait_ms_max,
        queue_requests_max=config.queue_requests_max,
    )
    pos = None
    if kek is not None:
        pos = pos_service(ledger, kek)
    elif with_demo:
        raise ConfigError("the demo needs a key-encrypting key")
    else:
        log.warning("no key-encrypting key: the POS host and the terminal gateway are off")
    app = build_app(config, metrics, ledger, pos, kek)
    http = HttpListener(app)
    await http.start(config.host, config.port)
    gateway: RunningGateway | None = None
    try:
        url = f"http://{config.host}:{config.port}"
        ready: dict[str, object] = {"event": "listening", "role": role, "url": url}
        if pos is not None and kek is not None and role == "serve":
            gateway = await start_gateway(config, kek, InProcessHost(pos.handle), metrics)
            ready["gateway"] = f"{config.gateway_host}:{gateway.port}"
        if with_demo and pos is not None and kek is not None:
            ready["demo_accounts"] = await demo.load(ledger)
            ready["demo_pos"] = await demo.load_pos(ledger, pos.directory, kek)
        settle_gc()
        # One line on stdout tells people (and test harnesses) where we are.
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        log.info("listening", extra={"role": role, "url": url})
        if with_demo and gateway is not None:
            await demo.pos_session(config.gateway_host, gateway.port, sys.stdout)
        await stop.wait()
    finally:
        log.info("shutting down")
        if gateway is not None:
            await gateway.close()
        await http.close()


def pos_service(ledger: Ledger, kek: bytes) -> PosService:
    """The POS host: its card directory, the card-account locks and PIN checks (which the
    admin services may share: `build_app` can set its own on `accounts` and `pins`), and
    the reader of the gateway's zone PIN blocks (the host and the gateway derive one zone
    PIN key from the KEK)."""
    directory = Directory(ledger.store.engine)
    return PosService(
        ledger,
        directory,
        token_key_of(kek),
        pin_of=security.zone_pin_reader(kek),
        accounts=Accounts(ledger),
        pins=Pins(Records(ledger.store.engine), Vault(kek), directory),
    )


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop
