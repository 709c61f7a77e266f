"""Configuration: defaults < TOML file < CARDCORE_* environment variables < command-line flags.

The defaults give a working embedded server: a SQLite file under ./data, loopback only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cardcore import limits

log = logging.getLogger(__name__)

ENV_PREFIX = "CARDCORE_"
TEST_ENV_PREFIX = "CARDCORE_TEST_"  # the test suite's own variables, not settings
KEK_SOURCES = frozenset({"kek", "kek_file"})  # two ways to give one key: a layer sets both


class ConfigError(ValueError):
    """A setting is unknown, mistyped or unsafe."""


@dataclass(frozen=True, slots=True)
class Config:
    db_url: str = "sqlite:///data/cardcore.db"
    host: str = "127.0.0.1"
    port: int = 8080
    internal_token: str = ""  # required when `host` is not a loopback address
    batch_size_max: int = limits.BATCH_SIZE_MAX_DEFAULT
    batch_wait_ms_max: int = limits.BATCH_WAIT_MS_MAX_DEFAULT
    queue_requests_max: int = limits.WRITER_QUEUE_REQUESTS_MAX
    log_level: str = "INFO"
    log_format: str = "json"  # json | text
    # The key-encrypting key (64 hex digits), or a file holding it: seals terminal master
    # keys and keys card numbers. Without one the POS host and the gateway are off.
    kek: str = dataclasses.field(default="", repr=False)
    kek_file: str = ""
    gateway_host: str = "127.0.0.1"  # terminals connect here (cardcore serve, cardcore gateway)
    gateway_port: int = 5800
    gateway_ledger_urls: str = "http://127.0.0.1:8080"  # cardcore gateway: comma-separated
    gateway_tls_cert: str = ""  # PEM files: with both, terminals connect over TLS
    gateway_tls_key: str = ""
    # A PEM file of the CA that signs terminals' client certificates: with it a terminal must
    # present one (TLS), and its connection speaks only for the terminal id in its subject CN.
    gateway_tls_client_ca: str = ""
    gateway_saf_file: str = "data/gateway-saf.jsonl"  # reversals owed to the host
    gateway_metrics_port: int = 0  # cardcore gateway: /metrics and /healthz here; 0 = none
    # Requests a terminal may send a second (a burst of as many); past it: 91.
    gateway_terminal_rate_per_s: int = limits.GATEWAY_TERMINAL_RATE_PER_S
    # 1: several gateway processes listen on one port (SO_REUSEPORT); 0: a second listener
    # on the port (another host's gateway left on it, say) is refused, address in use.
    gateway_shared_port: int = 0

    def check(self) -> Config:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, not {self.port}")
        if not 1 <= self.batch_size_max <= limits.BATCH_SIZE_MAX_CEILING:
            raise ConfigError(f"batch_size_max must be 1..{limits.BATCH_SIZE_MAX_CEILING}")
        if not 0 <= self.batch_wait_ms_max <= limits.BATCH_WAIT_MS_MAX_CEILING:
            raise ConfigError(f"batch_wait_ms_max must be 0..{limits.BATCH_WAIT_MS_MAX_CEILING}")
        if not 1 <= self.queue_requests_max <= limits.WRITER_QUEUE_REQUESTS_MAX:
            raise ConfigError(f"queue_requests_max must be 1..{limits.WRITER_QUEUE_REQUESTS_MAX}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        if self.log_format not in ("json", "text"):
            raise ConfigError("log_format must be json or text")
        if not 0 < self.gateway_port < 65536:
            raise ConfigError(f"gateway_port must be 1..65535, not {self.gateway_port}")
        if not 0 <= self.gateway_metrics_port < 65536:
            raise ConfigError("gateway_metrics_port must be 0..65535")
        rate_max = limits.GATEWAY_TERMINAL_RATE_PER_S_MAX
        if not 1 <= self.gateway_terminal_rate_per_s <= rate_max:
            raise ConfigError(f"gateway_terminal_rate_per_s must be 1..{rate_max}")
        if self.gateway_shared_port not in (0, 1):
            raise ConfigError("gateway_shared_port must be 0 or 1")
        if bool(self.gateway_tls_cert) != bool(self.gateway_tls_key):
            raise ConfigError("gateway_tls_cert and gateway_tls_key go together")
        if self.gateway_tls_client_ca and not self.gateway_tls_cert:
            raise ConfigError("gateway_tls_client_ca needs gateway_tls_cert and gateway_tls_key")
        if self.kek and not _is_kek_hex(self.kek):
            raise ConfigError("kek must be 64 hexadecimal digits (32 bytes)")
        if self.internal_token and not _TOKEN_RE.fullmatch(self.internal_token):
            raise ConfigError(
                "internal_token is printable ASCII without spaces (it goes into a header)"
            )
        if not is_loopback(self.host) and len(self.internal_token) < 16:
            raise ConfigError(
                f"listening on {self.host} (not loopback) needs internal_token "
                "(CARDCORE_INTERNAL_TOKEN) of at least 16 characters"
            )
        if not self.gateway_saf_file.strip():
            raise ConfigError("gateway_saf_file must name a file (reversals owed to the host)")
        for url in self.gateway_ledger_urls.split(","):
            if not url.strip().startswith(("http://", "https://")):
                raise ConfigError(f"gateway_ledger_urls: {url.strip()!r} is not an http(s) URL")
        return self

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: a header value as it is sent


def _is_kek_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def load_kek(config: Config) -> bytes | None:
    """The key-encrypting key from `kek`, else from `kek_file`; None when neither is set."""
    if config.kek:
        return bytes.fromhex(config.kek)
    if not config.kek_file:
        return None
    try:
        text = Path(config.kek_file).read_text(encoding="ascii").strip()
        mode = Path(config.kek_file).stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read kek_file {config.kek_file}: {exc}") from None
    if not _is_kek_hex(text):
        raise ConfigError(f"kek_file {config.kek_file} must hold 64 hexadecimal digits")
    if mode & 0o077:  # `chmod 600`: the key opens every card number and terminal key
        log.warning(
            "kek_file is readable by others than its owner",
            extra={"path": config.kek_file, "mode": oct(mode & 0o777)},
        )
    return bytes.fromhex(text)


def create_kek_file(path: str) -> bool:
    """Write a new random key-encrypting key to `path` (mode 0600) unless one is there;
    True when it wrote one. Losing it loses every sealed terminal key: back it up."""
    target = Path(path)
    if target.exists():
        if not target.is_file():
            raise ConfigError(f"kek_file {path} is not a file")
        load_kek(Config(kek_file=path))  # an existing key must be one (64 hex digits)
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(os.urandom(32).hex() + "\n")
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            with Path(path).open("rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:  # TOML is UTF-8: a Latin-1 comment, say
            raise ConfigError(f"config file {path} is not UTF-8 text") from exc
        values.update(_typed(document, f"config file {path}"))
    names = {ENV_PREFIX + f.name.upper(): f.name for f in fields(Config)}
    unknown = sorted(
        k for k in environ
        if k.startswith(ENV_PREFIX) and k not in names and k != ENV_PREFIX + "CONFIG"
        and not k.startswith(TEST_ENV_PREFIX)
    )  # fmt: skip
    if unknown:  # a mistyped name would leave its setting at the default, unseen
        raise ConfigError(f"environment: unknown setting {unknown[0]}")
    env = _typed(
        {name: environ[k] for k, name in names.items() if k in environ},
        "environment", from_text=True,
    )  # fmt: skip
    if KEK_SOURCES & env.keys():  # the key the environment names wins over the file's
        for name in KEK_SOURCES:
            values.pop(name, None)
    values.update(env)
    return Config(**values)


def _typed(values: Mapping[str, Any], source: str, *, from_text: bool = False) -> dict[str, Any]:
    known = {f.name: f for f in fields(Config)}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown setting {name!r}")
        want_int = known[name].type in ("int", int)
        typed = value
        if want_int and from_text:
            try:
                typed = int(value)
            except ValueError:
                raise ConfigError(f"{source}: {name} must be an integer") from None
        if want_int and (isinstance(typed, bool) or not isinstance(typed, int)):
            raise ConfigError(f"{source}: {name} must be an integer")
        if not want_int and not isinstance(typed, str):
            raise ConfigError(f"{source}: {name} must be a string")
        out[name] = typed
    return out
