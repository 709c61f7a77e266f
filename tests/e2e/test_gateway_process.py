"""The gateway as the processes an operator runs: `cardcore gateway` beside `cardcore ledger`
(failover across ledger URLs, metrics), TLS to terminals, the bootstrap commands and the
terminal simulator on the command line, and `serve` without a key-encrypting key."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import ssl
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cardcore import migrate
from cardcore.frontend_gateway.terminal import PosTerminal
from tests.e2e.test_cli import Server
from tests.helpers import cardcore_env, free_port, run_cardcore

KEK = "0f" * 32
MID = "E2E000000000001"


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(  # noqa: S310 - loopback test servers
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _terminal_and_card(url: str, tid: str) -> tuple[bytes, str, int]:
    status, terminal = _post(
        f"{url}/internal/v1/terminals",
        {"tid": tid, "mid": MID, "store": "S-E2E", "legal_entity": "LE-E2E", "key_mode": "aes"},
    )
    assert status == 201, terminal
    status, issued = _post(
        f"{url}/internal/v1/cards", {"legal_entity": "LE-E2E", "count": 1, "balance": 10_000}
    )
    assert status == 201, issued
    card = issued["cards"][0]
    return bytes.fromhex(terminal["tmk"]), card["pan"], card["account_id"]


async def _sign_on_and_buy(terminal: PosTerminal, pan: str, amount: int) -> tuple[str, str]:
    try:
        signed = await terminal.sign_on()
        bought = await terminal.purchase(pan, amount)
        return signed.code, bought.code
    finally:
        await terminal.close()


def test_gateway_process_fails_over_to_the_next_ledger_and_serves_metrics(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    migrate.upgrade(db)
    port = free_port()
    ledger_env = cardcore_env(CARDCORE_KEK=KEK)
    with Server(["ledger", "--db", db, "--port", str(port)], tmp_path, ledger_env) as ledger:
        url = ledger.ready["url"]
        assert "gateway" not in ledger.ready  # the ledger role runs no gateway
        tmk, pan, _account = _terminal_and_card(url, "E2EGW001")
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        gateway_port, metrics_port = free_port(), free_port()
        env = cardcore_env(
            CARDCORE_KEK=KEK,
            CARDCORE_GATEWAY_PORT=str(gateway_port),
            CARDCORE_GATEWAY_METRICS_PORT=str(metrics_port),
            CARDCORE_GATEWAY_SAF_FILE=str(tmp_path / "saf.jsonl"),
        )
        with Server(["gateway", "--ledger", f"{dead},{url}"], tmp_path, env) as gateway:
            assert gateway.ready["role"] == "gateway"
            assert gateway.ready["ledgers"] == [dead, url]
            terminal = PosTerminal("127.0.0.1", gateway_port, "E2EGW001", MID, tmk)
            assert asyncio.run(_sign_on_and_buy(terminal, pan, 1_500)) == ("00", "00")
            with urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=10
            ) as response:
                text = response.read().decode()
            assert 'cardcore_gateway_messages_total{code="00",mti="0200"} 1.0' in text
            assert gateway.stop() == 0
        assert "ledger failover" in (tmp_path / gateway.log.name).read_text()
        assert ledger.stop() == 0


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "gw.pem", tmp_path / "gw.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_terminals_over_tls(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'tls.db'}"
    migrate.upgrade(db)
    cert, key = _self_signed(tmp_path)
    gateway_port = free_port()
    env = cardcore_env(
        CARDCORE_KEK=KEK,
        CARDCORE_GATEWAY_PORT=str(gateway_port),
        CARDCORE_GATEWAY_TLS_CERT=str(cert),
        CARDCORE_GATEWAY_TLS_KEY=str(key),
        CARDCORE_GATEWAY_SAF_FILE=str(tmp_path / "saf.jsonl"),
    )
    with Server(["serve", "--db", db, "--port", str(free_port())], tmp_path, env) as server:
        tmk, pan, _account = _terminal_and_card(server.ready["url"], "E2ETLS01")
        context = ssl.create_default_context(cafile=str(cert))
        terminal = PosTerminal("localhost", gateway_port, "E2ETLS01", MID, tmk, tls=context)
        assert asyncio.run(_sign_on_and_buy(terminal, pan, 700)) == ("00", "00")

        # A terminal speaking plain TCP to the TLS port gets nowhere and breaks nothing.
        plain = PosTerminal("127.0.0.1", gateway_port, "E2ETLS01", MID, tmk, timeout_s=5)

        async def plain_sign_on() -> str:
            try:
                return (await plain.sign_on()).code
            except Exception as exc:  # noqa: BLE001 - any failure is the expected outcome
                return type(exc).__name__
            finally:
                await plain.close()

        assert asyncio.run(plain_sign_on()) != "00"
        again = PosTerminal("localhost", gateway_port, "E2ETLS01", MID, tmk, tls=context)
        again.stan = "000100"  # a terminal's STAN moves on (000002 again would be a 94)
        assert asyncio.run(_sign_on_and_buy(again, pan, 300)) == ("00", "00")
        assert server.stop() == 0


def test_bootstrap_commands_and_the_pos_simulator(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate.upgrade(db)
    port, gateway_port = free_port(), free_port()
    env = cardcore_env(
        CARDCORE_KEK=KEK,
        CARDCORE_PORT=str(port),
        CARDCORE_GATEWAY_PORT=str(gateway_port),
        CARDCORE_GATEWAY_SAF_FILE=str(tmp_path / "saf.jsonl"),
        CARDCORE_DB_URL=db,
    )
    with Server(["serve"], tmp_path, env) as server:
        added = run_cardcore(
            "terminal",
            "add",
            "--tid",
            "E2ECLI01",
            "--mid",
            MID,
            "--store",
            "S-CLI",
            "--legal-entity",
            "LE-CLI",
            cwd=tmp_path,
            env=env,
        )
        assert added.returncode == 0, added.stderr
        terminal = json.loads(added.stdout)
        assert terminal["key_mode"] == "aes" and len(terminal["tmk"]) == 32
        again = run_cardcore(
            "terminal", "add", "--tid", "E2ECLI01", "--mid", MID, "--store", "S", "--legal-entity",
            "LE", cwd=tmp_path, env=env,
        )  # fmt: skip
        assert again.returncode == 2
        assert again.stderr.startswith("cardcore: error: ") and "exists" in again.stderr

        out = tmp_path / "cards.csv"
        issued = run_cardcore(
            "card", "issue", "--legal-entity", "LE-CLI", "--count", "3", "--balance", "5000",
            "--out", str(out), cwd=tmp_path, env=env,
        )  # fmt: skip
        assert issued.returncode == 0, issued.stderr
        assert json.loads(issued.stdout) == {"issued": 3, "out": str(out)}
        rows = out.read_text().splitlines()
        assert rows[0] == "card_number,account_id" and len(rows) == 4
        pan = rows[1].split(",")[0]

        pos = ["pos", "--tid", "E2ECLI01", "--mid", MID, "--tmk", terminal["tmk"]]
        pos += ["--gateway", f"127.0.0.1:{gateway_port}", "--state", str(tmp_path / "t.json")]
        bought = run_cardcore(
            *pos[:1], "purchase", *pos[1:], "--card", pan, "--amount", "1234", "--raw",
            cwd=tmp_path, env=env,
        )  # fmt: skip
        assert bought.returncode == 0, bought.stderr
        lines = bought.stdout.splitlines()
        assert lines[0].startswith("sign-on") and "00 approved" in lines[0]
        purchase = next(x for x in lines if x.startswith("purchase"))
        assert "amount 12.34" in purchase and "balance 37.66" in purchase
        assert any(x.strip().startswith("sent     ") for x in lines)  # --raw shows the bytes
        stan = purchase.rsplit("stan ", 1)[1]

        voided = run_cardcore(
            *pos[:1], "void", *pos[1:], "--card", pan, "--amount", "1234",
            "--original-stan", stan, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert voided.returncode == 0, voided.stdout + voided.stderr
        assert "balance 50.00" in voided.stdout

        settled = run_cardcore(*pos[:1], "settle", *pos[1:], cwd=tmp_path, env=env)
        assert settled.returncode == 0 and "balanced" in settled.stdout

        missing = run_cardcore(*pos[:1], "void", *pos[1:], cwd=tmp_path, env=env)
        assert missing.returncode == 2
        assert missing.stderr.strip().splitlines()[-1] == "cardcore: error: void needs --card"
        declined = run_cardcore(
            *pos[:1], "purchase", *pos[1:], "--card", pan, "--amount", "999999",
            cwd=tmp_path, env=env,
        )  # fmt: skip
        assert declined.returncode == 1 and "51 insufficient funds" in declined.stdout
        assert server.stop() == 0
    log = server.log.read_text()
    assert pan not in log and terminal["tmk"] not in log


def test_serve_without_a_key_encrypting_key_runs_no_pos(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'nokek.db'}"
    migrate.upgrade(db)
    env = {k: v for k, v in cardcore_env().items() if k != "CARDCORE_KEK"}
    with Server(["serve", "--db", db, "--port", str(free_port())], tmp_path, env) as server:
        assert "gateway" not in server.ready
        status, body = _post(f"{server.ready['url']}/internal/v1/pos", {"requests": []})
        assert status == 503 and body["error"]["code"] == "pos_disabled"
        assert server.stop() == 0
    assert "no key-encrypting key" in server.log.read_text()
    assert not os.path.exists(tmp_path / "data" / "kek")  # nothing made behind our back
