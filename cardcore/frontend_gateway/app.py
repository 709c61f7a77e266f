"""Assemble a running gateway: store and forward, processor, listener. `cardcore serve`
runs it beside the ledger with the in-process host; `cardcore gateway` runs it alone with
the HTTP host (several ledger URLs, failover)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from cardcore import limits
from cardcore.config import Config, ConfigError
from cardcore.frontend_gateway.host import Host
from cardcore.frontend_gateway.processor import Processor
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.server import GatewayServer
from cardcore.metrics import Metrics


@dataclass
class RunningGateway:
    server: GatewayServer
    saf: ReversalQueue
    host: Host

    @property
    def port(self) -> int:
        return self.server.port

    async def close(self, grace_s: float = limits.GATEWAY_SHUTDOWN_GRACE_S) -> None:
        await self.server.close(grace_s)
        await self.saf.close()
        await self.host.close()


def tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.gateway_tls_cert:
        return None
    # A server context that trusts no CA but the terminals' own (with gateway_tls_client_ca):
    # the system's CAs would let any public certificate name a terminal.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.gateway_tls_cert, config.gateway_tls_key)
    except OSError as exc:  # a missing file, or PEM that is not a certificate and its key
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"gateway_tls_cert {config.gateway_tls_cert} and gateway_tls_key "
            f"{config.gateway_tls_key}: {reason}"
        ) from None
    if config.gateway_tls_client_ca:
        try:
            context.load_verify_locations(cafile=config.gateway_tls_client_ca)
        except OSError as exc:  # ssl.SSLError too: PEM that holds no certificate
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"gateway_tls_client_ca {config.gateway_tls_client_ca}: {reason}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_gateway(config: Config, kek: bytes, host: Host, metrics: Metrics) -> RunningGateway:
    saf = ReversalQueue(
        Path(config.gateway_saf_file), on_change=metrics.gateway_reversals_pending.set
    )
    saf.open()
    metrics.gateway_reversals_pending.set(len(saf.pending))
    processor = Processor(
        host, saf, kek, metrics, terminal_rate_per_s=config.gateway_terminal_rate_per_s
    )
    server = GatewayServer(
        processor,
        metrics,
        host=config.gateway_host,
        port=config.gateway_port,
        tls=tls_context(config),
        shared_port=bool(config.gateway_shared_port),
    )
    await server.start()
    saf.start(host)
    return RunningGateway(server, saf, host)
