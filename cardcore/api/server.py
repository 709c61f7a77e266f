"""Run the HTTP service until SIGINT or SIGTERM, then shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys

from aiohttp import web

from cardcore import demo, limits
from cardcore.api.app import build_app
from cardcore.config import Config
from cardcore.ledger import http as ledger_http
from cardcore.ledger.service import Ledger
from cardcore.metrics import Metrics

log = logging.getLogger(__name__)


async def serve(config: Config, *, role: str, with_demo: bool) -> None:
    metrics = Metrics()
    ledger = Ledger.open(
        config.db_url,
        metrics,
        batch_size_max=config.batch_size_max,
        batch_wait_ms_max=config.batch_wait_ms_max,
        queue_requests_max=config.queue_requests_max,
    )
    app = build_app(config, metrics, ledger)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=limits.SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        await site.start()
        url = f"http://{config.host}:{config.port}"
        ready: dict[str, object] = {"event": "listening", "role": role, "url": url}
        if with_demo:
            ready["demo_accounts"] = await demo.load(app[ledger_http.LEDGER_KEY])
        # One line on stdout tells people (and test harnesses) where we are.
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        log.info("listening", extra={"role": role, "url": url})
        await _until_signalled()
    finally:
        log.info("shutting down")
        await runner.cleanup()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
