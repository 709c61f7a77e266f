"""Prometheus metrics. One registry per application instance (no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ledger_ops = Counter(
            "cardcore_ledger_ops",
            "Ledger operations answered, by result code",
            ["result"],
            registry=self.registry,
        )
        self.ledger_batch_ops = Histogram(
            "cardcore_ledger_batch_ops",
            "Operations decided and committed in one writer batch",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.ledger_commit_seconds = Histogram(
            "cardcore_ledger_commit_seconds",
            "Time from the start of a batch's transaction to its commit",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.ledger_queue_depth = Gauge(
            "cardcore_ledger_queue_depth",
            "Requests waiting for the ledger writer",
            registry=self.registry,
        )
        self.ledger_busy = Counter(
            "cardcore_ledger_busy",
            "Requests refused at once because the writer queue was full",
            registry=self.registry,
        )
        self.ledger_commit_failures = Counter(
            "cardcore_ledger_commit_failures",
            "Batches whose transaction failed (nothing of them was acknowledged)",
            registry=self.registry,
        )
        self.http_requests = Counter(
            "cardcore_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.gateway_messages = Counter(
            "cardcore_gateway_messages",
            "Terminal messages answered by the gateway, by request MTI and response code",
            ["mti", "code"],
            registry=self.registry,
        )
        self.gateway_seconds = Histogram(
            "cardcore_gateway_seconds",
            "Time from a terminal message read whole to its reply written, by request MTI",
            ["mti"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.gateway_connections = Gauge(
            "cardcore_gateway_connections",
            "Terminal connections open",
            registry=self.registry,
        )
        self.gateway_signed_on = Gauge(
            "cardcore_gateway_signed_on",
            "Terminals signed on (holding working keys)",
            registry=self.registry,
        )
        self.gateway_mac_failures = Counter(
            "cardcore_gateway_mac_failures",
            "Requests whose MAC did not verify",
            registry=self.registry,
        )
        self.gateway_frames_dropped = Counter(
            "cardcore_gateway_frames_dropped",
            "Connections closed because framing was lost, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.gateway_reversals_pending = Gauge(
            "cardcore_gateway_reversals_pending",
            "Reversals stored and not yet confirmed by the host",
            registry=self.registry,
        )
