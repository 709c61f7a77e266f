"""The gateway as the processes an operator runs: `cardcore gateway` beside `cardcore ledger`
(failover across ledger URLs, metrics), TLS to terminals, the bootstrap commands and the
terminal simulator on the command line (its card, points, coupon, service, manager and
reversal actions against `serve --demo`), and `serve` without a key-encrypting key."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import ssl
import stat
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cardcore import demo, migrate
from cardcore.cards.model import mask_pan
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
        # A gateway with another key than the ledger's served, and every sign-on failed (96,
        # a traceback in its log): it compares the keys' check values and refuses to start.
        wrong = run_cardcore(
            "gateway", "--ledger", url, cwd=tmp_path,
            env={**env, "CARDCORE_KEK": "f0" * 32, "CARDCORE_GATEWAY_PORT": str(free_port())},
        )  # fmt: skip
        assert wrong.returncode == 2, wrong.stderr
        assert "the gateway's key-encrypting key is not the ledger's" in wrong.stderr
        assert "Traceback" not in wrong.stderr
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

        blocked = tmp_path / "a-file"  # an --out that cannot be written: nothing is issued
        blocked.write_text("not a folder\n")
        refused = run_cardcore(
            "card", "issue", "--legal-entity", "LE-CLI", "--count", "3",
            "--out", str(blocked / "cards.csv"), cwd=tmp_path, env=env,
        )  # fmt: skip
        assert refused.returncode == 2 and refused.stderr.startswith("cardcore: error: --out")
        out = tmp_path / "cards.csv"
        out.write_text("an older print file\n")
        kept = run_cardcore(
            "card", "issue", "--legal-entity", "LE-CLI", "--count", "3",
            "--out", str(out), cwd=tmp_path, env=env,
        )  # fmt: skip
        assert (
            kept.returncode == 2
            and f"--out {out}: exists; an earlier print file is never replaced" in kept.stderr
        ), kept.stderr
        assert out.read_text() == "an older print file\n"  # its numbers are never replaced
        out.unlink()
        issued = run_cardcore(
            "card", "issue", "--legal-entity", "LE-CLI", "--count", "3", "--balance", "5000",
            "--out", str(out), cwd=tmp_path, env=env,
        )  # fmt: skip
        assert issued.returncode == 0, issued.stderr
        assert json.loads(issued.stdout) == {"issued": 3, "out": str(out)}
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
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
        assert pan not in bought.stdout and mask_pan(pan) in bought.stdout  # masked in them
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


def _admin(url: str, token: str, method: str, path: str, body: Any) -> Any:
    request = urllib.request.Request(  # noqa: S310 - loopback test servers
        url + path,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
        assert response.status in (200, 201)
        return json.loads(response.read())


def _club_card_and_coupon(url: str, token: str) -> tuple[str, str]:
    """On top of `serve --demo` and `cardcore admin demo`, as the README's quickstart goes: a
    points program (1 point a yuan), a member's card of a class in it at the demo terminal's
    store, and an active coupon campaign (20.00 off 50.00) with one code."""
    store, entity = demo.DEMO_STORE, demo.DEMO_ENTITY
    _admin(url, token, "POST", "/v1/points/programs", {"code": "CLUB", "name": "Club points",
           "asset": "PTS:CLUB", "redeem_points": 100, "redeem_fen": 100})  # fmt: skip
    _admin(url, token, "POST", "/v1/points/programs/CLUB/rules",
           {"code": "BASE", "kind": "base", "points": 1, "per_fen": 100})  # fmt: skip
    _admin(url, token, "POST", "/v1/card-classes",
           {"code": "CLUB", "name": "Club", "named": True, "points_program": "CLUB"})  # fmt: skip
    for function in ("points", "coupon"):
        _admin(url, token, "POST", "/v1/grants", {"store": store, "function": function})
    member = _admin(url, token, "POST", "/v1/members",
                    {"mobile": "13600000001", "name": "Lin Yue", "home_store": store})  # fmt: skip
    card = _admin(url, token, "POST", "/v1/cards",
                  {"class_code": "CLUB", "store": store, "member_id": member["id"]})  # fmt: skip
    now_ms = int(time.time() * 1000)
    _admin(url, token, "POST", "/v1/coupon-campaigns", {
        "code": "SPRING", "name": "Spring 20 off 50", "kind": "amount_off",
        "legal_entity": entity, "value_fen": 2_000, "min_spend_fen": 5_000,
        "valid_from_ms": now_ms - 3_600_000, "valid_to_ms": now_ms + 86_400_000,
    })  # fmt: skip
    _admin(url, token, "PATCH", "/v1/coupon-campaigns/SPRING", {"state": "active"})
    codes = _admin(url, token, "POST", "/v1/coupon-campaigns/SPRING/codes", {"count": 1})
    return str(card["pan"]), str(codes["codes"][0])


def _reply_line(done: Any, action: str) -> str:
    """The line of `cardcore pos ACTION`'s reply (after the sign-on's)."""
    lines = [x for x in done.stdout.splitlines() if x.startswith(f"{action} ")]
    assert len(lines) == 1, done.stdout + done.stderr
    return str(lines[0])


def _after(line: str, label: str) -> str:
    return line.split(f"{label} ", 1)[1].split(",", 1)[0]


def test_pos_simulator_points_coupons_service_manager_and_reverse_on_the_demo(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    migrate.upgrade(db)
    gateway_port = free_port()
    env = cardcore_env(
        CARDCORE_KEK=KEK,
        CARDCORE_PORT=str(free_port()),
        CARDCORE_GATEWAY_PORT=str(gateway_port),
        CARDCORE_GATEWAY_SAF_FILE=str(tmp_path / "saf.jsonl"),
        CARDCORE_DB_URL=db,
    )
    with Server(["serve", "--demo"], tmp_path, env) as server:
        # The demo's scripted session uses the demo terminal too: it ends (and settles its
        # batch) before the simulator below signs on.
        settled = server.lines_until("POS DEMO0001 settlement")[-1]
        assert "00 approved" in settled and ", balanced," in settled, settled
        minted = run_cardcore("admin", "token", cwd=tmp_path, env=env)
        assert minted.returncode == 0, minted.stderr
        token = json.loads(minted.stdout)["token"]
        assert run_cardcore("admin", "demo", cwd=tmp_path, env=env).returncode == 0
        pan, code = _club_card_and_coupon(server.ready["url"], token)
        state = tmp_path / "demo-pos.json"

        def pos(action: str, *options: str) -> Any:
            return run_cardcore(
                "pos", action, "--gateway", f"127.0.0.1:{gateway_port}", "--state", str(state),
                *options, cwd=tmp_path, env=env,
            )  # fmt: skip

        # Points on a cash purchase, then part of its goods back (980000 names it by F37).
        earned = pos("points-earn", "--card", pan, "--amount", "5000", "--raw")
        assert earned.returncode == 0, earned.stdout + earned.stderr
        line = _reply_line(earned, "points-earn")
        assert "00 approved" in line and "points 50, points balance 50" in line, line
        assert pan not in earned.stdout and mask_pan(pan) in earned.stdout  # --raw, masked
        returned = pos(
            "points-return", "--card", pan, "--amount", "2550", "--rrn", _after(line, "rrn")
        )
        assert returned.returncode == 0, returned.stdout + returned.stderr
        line = _reply_line(returned, "points-return")
        assert "00 approved" in line and "points -25, points balance 25" in line, line
        # The demo's own cards belong to no points program: the refusal is printed, exit 1.
        refused = pos("points-redeem", "--card", demo.DEMO_CARDS[0], "--points", "100")
        assert refused.returncode == 1
        assert "57 not permitted" in _reply_line(refused, "points-redeem")
        assert "refused by points_no_program" in refused.stdout

        # A coupon reserved, redeemed under its reservation's STAN, used, then reversed.
        reserved = pos("coupon-reserve", "--coupon", code, "--amount", "12000", "--card", pan)
        line = _reply_line(reserved, "coupon-reserve")
        assert "00 approved" in line and "discount 20.00" in line and "campaign SPRING" in line
        held = _after(line, "stan")
        redeemed = pos("coupon-redeem", "--coupon", code, "--amount", "12000",
                       "--card", pan, "--original-stan", held.lstrip("0"))  # fmt: skip
        line = _reply_line(redeemed, "coupon-redeem")
        assert "00 approved" in line and "discount 20.00" in line, line
        assert _after(line, "stan") == held
        used = pos("coupon-query", "--coupon", code, "--amount", "12000")
        assert used.returncode == 1 and "C2 coupon already used" in used.stdout
        undone = pos("reverse", "--original-stan", held)  # the redeem kept under that STAN
        assert undone.returncode == 0, undone.stdout + undone.stderr
        line = _reply_line(undone, "reverse")
        assert "00 approved" in line and _after(line, "stan") == held, line
        free = pos("coupon-query", "--coupon", code, "--amount", "12000")
        assert "00 approved" in _reply_line(free, "coupon-query")
        unknown = pos("coupon-query", "--coupon", "0000-0000-0000-0000", "--amount", "12000")
        assert unknown.returncode == 1 and "C1 coupon unknown" in unknown.stdout

        # Service and manager cards: the demo has neither; their refusals come back.
        service = pos("service-redeem", "--card", demo.DEMO_CARDS[1], "--uses", "2")
        assert "refused by service_no_package" in _reply_line(service, "service-redeem")
        manager = pos("manager-auth", "--card", demo.DEMO_CARDS[1], "--pin", "246810",
                      "--amount", "30000", "--discount", "1500", "--reason", "damaged",
                      "--raw")  # fmt: skip
        assert "refused by manager_not_manager" in _reply_line(manager, "manager-auth")
        assert "*" * 32 in manager.stdout  # the AES PIN block, starred
        assert demo.DEMO_CARDS[1] not in manager.stdout

        # A purchase reversed by its STAN: the money is back and it leaves the batch; a void
        # reversed: its purchase stands. The terminal's totals then match the host's.
        card = demo.DEMO_CARDS[2]
        bought = pos("purchase", "--card", card, "--amount", "1500")
        assert "balance 485.00" in _reply_line(bought, "purchase")
        stan = _after(_reply_line(bought, "purchase"), "stan")
        back = pos("reverse", "--original-stan", stan)
        assert back.returncode == 0 and f"stan {stan}" in _reply_line(back, "reverse")
        assert "balance 500.00" in _reply_line(pos("inquiry", "--card", card), "inquiry")
        kept = pos("purchase", "--card", card, "--amount", "1200")
        kept_stan = _after(_reply_line(kept, "purchase"), "stan")
        voided = pos("void", "--card", card, "--amount", "1200", "--original-stan", kept_stan)
        assert "balance 500.00" in _reply_line(voided, "void")
        assert pos("reverse").returncode == 0
        assert "balance 488.00" in _reply_line(pos("inquiry", "--card", card), "inquiry")
        settled = pos("settle")
        assert "not balanced" not in settled.stdout, settled.stdout  # no upload was needed
        line = _reply_line(settled, "settle")
        assert "00 approved, batch " in line and ", balanced," in line, line
        nothing = pos("reverse")  # the batch closed: nothing of it is left to reverse
        assert nothing.returncode == 2 and "no financial request" in nothing.stderr
        assert server.stop() == 0
    log = server.log.read_text()
    assert pan not in log


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
