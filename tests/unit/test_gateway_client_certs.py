"""Terminals bound to their TLS client certificates (`gateway_tls_client_ca`): a connection
whose certificate names one terminal (its subject CN) speaks for that terminal only. A
security review spoofed a terminal id from another connection: three wrong MACs under it
dropped the real terminal's keys, and sign-ons under it pushed its new keys out."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cardcore.config import Config, ConfigError
from cardcore.frontend_gateway.app import tls_context
from cardcore.frontend_gateway.processor import Processor
from cardcore.frontend_gateway.saf import ReversalQueue
from cardcore.frontend_gateway.security import KeyMode
from cardcore.frontend_gateway.server import GatewayServer
from cardcore.frontend_gateway.terminal import PosTerminal, TerminalError
from cardcore.metrics import Metrics
from tests.unit.test_gateway_fuzz import KEK, MID, PAN, TIDS, TMK, FakeHost

A, B = TIDS[0], TIDS[1]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None, *, ca: bool = False,
    dns: str | None = None,
) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A terminal CA, the gateway's certificate, and one client certificate per terminal
    (subject CN = its terminal id), plus one of another CA."""
    ca_key = _key()
    ca = _cert("Terminal CA", ca_key, ca=True)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    gw_key = _key()
    _write(tmp_path / "gw", _cert("localhost", gw_key, dns="localhost"), gw_key)
    for tid in (A, B):
        key = _key()
        _write(tmp_path / tid, _cert(tid, key, ca.subject, ca_key), key)
    stranger_key = _key()
    _write(tmp_path / "stranger", _cert(A, stranger_key), stranger_key)  # self-signed
    return tmp_path


def _client(pki: Path, who: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "gw.pem"))
    context.load_cert_chain(str(pki / f"{who}.pem"), str(pki / f"{who}.key"))
    return context


@pytest.fixture
async def gateway(pki: Path, tmp_path: Path) -> AsyncIterator[GatewayServer]:
    config = Config(
        gateway_tls_cert=str(pki / "gw.pem"), gateway_tls_key=str(pki / "gw.key"),
        gateway_tls_client_ca=str(pki / "ca.pem"),
    )  # fmt: skip
    saf = ReversalQueue(tmp_path / "saf.jsonl")
    saf.open()
    metrics = Metrics()
    server = GatewayServer(
        Processor(FakeHost(), saf, KEK, metrics), metrics, host="127.0.0.1", port=0,
        tls=tls_context(config),
    )  # fmt: skip
    await server.start()
    yield server
    await asyncio.wait_for(server.close(grace_s=1), 10)
    await saf.close()


def _terminal(gateway: GatewayServer, pki: Path, tid: str, cert: str) -> PosTerminal:
    return PosTerminal(
        "localhost", gateway.port, tid, MID, TMK, KeyMode.AES, timeout_s=5,
        tls=_client(pki, cert),
    )  # fmt: skip


async def test_a_connection_speaks_only_for_the_terminal_its_certificate_names(
    gateway: GatewayServer, pki: Path
) -> None:
    b = _terminal(gateway, pki, B, B)
    assert (await b.sign_on()).code == "00"
    assert (await b.purchase(PAN, 100)).code == "00"
    spoof = _terminal(gateway, pki, B, A)  # A's certificate, B's terminal id
    assert (await spoof.sign_on()).code == "97"  # B's keys stay as they are
    spoof.keys = b.keys  # even knowing B's keys: the connection is A's
    for _ in range(3):
        with pytest.raises(TerminalError):
            await spoof.purchase(PAN, 100)  # answered 97, unMAC'd
        spoof.pending_reversal = None
    assert (await b.purchase(PAN, 100)).code == "00"  # no strike counted, no keys dropped
    a = _terminal(gateway, pki, A, A)
    assert (await a.sign_on()).code == "00"
    for t in (a, b, spoof):
        await t.close()


@pytest.mark.parametrize("cert", ["stranger", None])
async def test_a_terminal_without_a_certificate_of_the_ca_cannot_connect(
    gateway: GatewayServer, pki: Path, cert: str | None
) -> None:
    context = ssl.create_default_context(cafile=str(pki / "gw.pem"))
    if cert is not None:
        context.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    t = PosTerminal("localhost", gateway.port, A, MID, TMK, KeyMode.AES, timeout_s=5, tls=context)
    with pytest.raises((ssl.SSLError, ConnectionError, TerminalError, OSError)):
        await t.sign_on()
    await t.close()


def test_a_client_ca_needs_the_gateways_own_certificate(pki: Path) -> None:
    with pytest.raises(ConfigError, match="gateway_tls_client_ca needs gateway_tls_cert"):
        Config(gateway_tls_client_ca=str(pki / "ca.pem")).check()
    with pytest.raises(ConfigError, match="gateway_tls_client_ca"):
        tls_context(Config(
            gateway_tls_cert=str(pki / "gw.pem"), gateway_tls_key=str(pki / "gw.key"),
            gateway_tls_client_ca=str(pki / "nowhere.pem"),
        ))  # fmt: skip
