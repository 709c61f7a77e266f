"""The whole test run's logs, scanned at the end for secrets (issue 4: no full card number,
ID number or PIN in any log line of the whole run).

Every log record of the test process is kept (root handler, level INFO and up, formatted as
`cardcore.logs.JsonFormatter` formats it, extra fields included); every real server process a
test starts registers its stderr file. At the end `tests/conftest.py` fails the run if any
line holds:
- a group card number in full (628888..., 16-19 digits, Luhn-valid),
- a mainland resident ID number (18 characters with a valid ISO 7064 check character),
- any secret a test registered with `remember` (PINs, keys, foreign card numbers, coupon
  codes answered over the admin API), the suites' own keys and internal token
  (`KNOWN_KEYS`), and every working key and PIN block made in the test process.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from cardcore.cards.model import luhn_ok
from cardcore.logs import JsonFormatter

_PAN = re.compile(r"(?<![0-9])628888[0-9]{10,13}(?![0-9])")
_RESIDENT_ID = re.compile(r"(?<![0-9A-Za-z])[0-9]{17}[0-9Xx](?![0-9A-Za-z])")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
LINES_MAX = 2_000_000  # records kept; past it the oldest are dropped (and counted)


def resident_id_ok(text: str) -> bool:
    total = sum(int(d) * w for d, w in zip(text[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == text[17].upper()


@dataclass
class LogScan:
    lines: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)  # value -> label
    dropped: int = 0

    def remember(self, label: str, value: object) -> None:
        text = str(value)
        if len(text) >= 4:
            self.secrets.setdefault(text, label)

    def keep(self, line: str) -> None:
        if len(self.lines) >= LINES_MAX:
            self.dropped += 1
            return
        self.lines.append(line)

    def leaks(self) -> list[str]:
        found: list[str] = []
        texts = [("test process", line) for line in self.lines]
        for path in self.files:
            if path.exists():
                texts.extend((path.name, line) for line in path.read_text("utf-8", "replace")
                             .splitlines())  # fmt: skip
        digits = sorted((v for v in self.secrets if v.isdigit()), key=len, reverse=True)
        others = sorted((v for v in self.secrets if not v.isdigit()), key=len, reverse=True)
        # One pattern each, the secrets as a trie: a flat alternation of thousands of
        # literals is tried literal by literal at every position (minutes for a run's logs).
        patterns = []
        if digits:
            patterns.append(re.compile(rf"(?<![0-9])(?:{_trie(digits)})(?![0-9])"))
        if others:
            patterns.append(re.compile(_trie([v.lower() for v in others]), re.IGNORECASE))
        labels = {k.lower(): v for k, v in self.secrets.items()}
        for where, line in texts:
            found.extend(f"{where}: card number {m[:6]}...{m[-4:]}" for m in _PAN.findall(line)
                         if luhn_ok(m))  # fmt: skip
            found.extend(f"{where}: resident ID {m[:3]}..." for m in _RESIDENT_ID.findall(line)
                         if resident_id_ok(m))  # fmt: skip
            for pattern in patterns:
                found.extend(f"{where}: {labels.get(m.lower(), 'a secret')}"
                             for m in pattern.findall(line))  # fmt: skip
        return found


def _trie(words: list[str]) -> str:
    """A regular expression matching any of `words`, longest first, as a trie: each
    position tries one branch per distinct next character, not every word."""
    root: dict[str, dict] = {}  # type: ignore[type-arg]
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here

    def pattern(node: dict[str, dict]) -> str:  # type: ignore[type-arg]
        chain = ""  # a run of single characters: no group, no recursion
        while len(node) == 1 and "" not in node:
            [(char, node)] = node.items()
            chain += re.escape(char)
        ends = "" in node
        branches = [re.escape(c) + pattern(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return chain
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return chain + (f"(?:{body})?" if ends else body)

    return pattern(root)


SCAN = LogScan()


class _Keeper(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            SCAN.keep(self.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is kept raw
            SCAN.keep(repr(record.__dict__))


# The keys the tests give the code (each module's constants), registered for every run:
# the key-encrypting keys and terminal master keys of the suites, and the e2e internal token.
KNOWN_KEYS = {
    "a test key-encrypting key": (bytes(range(32)).hex(), bytes(range(32, 64)).hex(),
                                  "0f" * 32, "5a" * 32),
    "a test terminal master key": ("00112233445566778899AABBCCDDEEFF",
                                   "0123456789ABCDEFFEDCBA9876543210"),
    "a test internal token": ("e2e-token-0123456789abcdef",),
}  # fmt: skip


def _watch_keys_and_pin_blocks() -> None:
    """Every working key pair made in this process (the gateway's and the reference
    terminal's, one per sign-on) and every PIN block a reference terminal enciphers are
    registered as they are made: none of them may reach a log line."""
    from cardcore.frontend_gateway import security  # noqa: PLC0415 - after logging is set up

    made = security.WorkingKeys.__post_init__

    def registered(self: security.WorkingKeys) -> None:
        made(self)
        SCAN.remember("a working PIN key", self.pik.hex())
        SCAN.remember("a working MAC key", self.mak.hex())

    security.WorkingKeys.__post_init__ = registered  # type: ignore[method-assign]
    for name in ("pin_block_0", "pin_block_4"):
        enciphered = getattr(security, name)

        def block(*args: object, _of: object = enciphered) -> bytes:
            out: bytes = _of(*args)  # type: ignore[operator]
            SCAN.remember("a PIN block", out.hex())
            return out

        setattr(security, name, block)


def install() -> None:
    root = logging.getLogger()
    root.addHandler(_Keeper())
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for label, values in KNOWN_KEYS.items():
        for value in values:
            SCAN.remember(label, value)
    _watch_keys_and_pin_blocks()
