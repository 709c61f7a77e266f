"""`make run`'s demo and its loyalty functions: `serve --demo` twice on one fresh SQLite
database loads the demo once and runs the scripted POS session each time with every loyalty
step approved (it gives back what it takes), `cardcore pos script` runs the same session from
a process without a database, and `cardcore admin demo` finds the demo organization made."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cardcore import demo, migrate
from cardcore.cards.model import mask_pan
from tests.e2e.test_cli import Server
from tests.helpers import cardcore_env, free_port, run_cardcore

PREFIX = f"POS {demo.DEMO_TERMINAL} "
SESSION_END = "  coupons "  # the last line the session prints (what to try by hand)
EARN = f"purchase 128.00 {mask_pan(demo.DEMO_LOYALTY_CARD)}"


def _answer(lines: list[str], step: str) -> str:
    """The answer the session printed for the one step whose label starts with `step`."""
    found = [x[len(PREFIX) :] for x in lines if x.startswith(PREFIX + step)]
    assert len(found) == 1, (step, lines)
    return found[0][len(step) :].strip()


def _number(answer: str, label: str) -> int:
    found = re.search(rf"(?:^|, ){label} (-?\d+)(?:,|$)", answer)
    assert found is not None, (label, answer)
    return int(found.group(1))


def _loyalty_steps_approved(lines: list[str]) -> tuple[int, str]:
    """Every loyalty step of one session approved; its points balance after the earning and
    the balance of the loyalty card after it."""
    earned = _answer(lines, EARN)
    assert earned.startswith("00 approved"), earned
    assert _number(earned, "points") > 0, earned  # 1 point a yuan: 128
    redeemed = _answer(lines, "points redeem 100")
    assert redeemed.startswith("00 approved") and "amount 1.00" in redeemed, redeemed
    assert _number(redeemed, "points balance") == _number(earned, "points balance") - 100
    first = demo.DEMO_COUPONS[0]  # given back by every session: the first code each time
    query = _answer(lines, f"coupon query {first} on 88.00")
    assert query.startswith("00 approved") and "campaign DEMO" in query, query
    coupon = _answer(lines, f"coupon redeem {first}")
    assert coupon.startswith("00 approved") and "discount 10.00" in coupon, coupon
    paid = _answer(lines, "purchase 78.00 (88.00 less it)")
    assert paid.startswith("00 approved") and _number(paid, "points") > 0, paid
    used = _answer(lines, f"service {demo.DEMO_PRODUCT}, 1 use")
    assert used.startswith("00 approved") and "uses left 9" in used, used
    for step in ("reversal of the service use", f"coupon {first} given back", "top-up confirmed"):
        assert _answer(lines, step).startswith("00 approved"), (step, lines)
    settled = _answer(lines, "settlement")
    assert settled.startswith("00 approved") and ", balanced," in settled, settled
    balance = re.search(r", balance (\d+\.\d\d),", earned)
    assert balance is not None, earned
    return _number(earned, "points balance"), balance.group(1)


def test_serve_demo_twice_loads_once_and_its_loyalty_session_is_approved_each_time(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    migrate.upgrade(db)
    env = cardcore_env(CARDCORE_DB_URL=db)
    seen: list[tuple[int, str]] = []
    ready: list[Any] = []
    for run in range(2):
        with Server(["serve", "--demo", "--port", str(free_port())], tmp_path, env) as server:
            ready.append(server.ready["demo_pos"])
            lines = server.lines_until(SESSION_END)
            seen.append(_loyalty_steps_approved(lines))
            assert demo.DEMO_LOYALTY_CARD not in "\n".join(lines)  # masked
            if run == 0:
                # A purchase by hand, left unsettled: the next session closes its batch first
                # and runs clean in a batch of its own (its STANs would meet this one's).
                by_hand = run_cardcore(
                    "pos", "purchase", "--card", demo.DEMO_CARDS[0], "--amount", "100",
                    cwd=tmp_path, env=env,
                )  # fmt: skip
                assert by_hand.returncode == 0 and "00" in by_hand.stdout, by_hand.stdout
            if run == 1:
                closed = _answer(lines, "close the batch found open")
                assert closed.startswith("00 approved"), closed
                # The same session from another process, which knows only demo.py's constants.
                script = run_cardcore("pos", "script", cwd=tmp_path, env=env)
                assert script.returncode == 0, script.stdout + script.stderr
                seen.append(_loyalty_steps_approved(script.stdout.splitlines()))
            assert server.stop() == 0, server.stderr
    assert ready[0] == ready[1]
    assert ready[0]["loyalty_card"] == demo.DEMO_LOYALTY_CARD
    # Each session earns more points than it spends; the money it took is topped up again.
    points = [p for p, _ in seen]
    assert points[0] < points[1] < points[2], seen
    assert {balance for _, balance in seen} == {"372.00"}, seen  # 500.00 less 128.00

    # The organization `serve --demo` made is the one `cardcore admin demo` makes.
    again = run_cardcore("admin", "demo", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    made = json.loads(again.stdout)["made"]
    assert made == {"entities": [], "stores": [], "classes": [], "grants": []}
