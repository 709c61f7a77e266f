"""Configuration: defaults < TOML file < CARDCORE_* environment variables < command-line flags.

The defaults give a working embedded server: a SQLite file under ./data, loopback only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cardcore import limits

ENV_PREFIX = "CARDCORE_"


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
        if not is_loopback(self.host) and len(self.internal_token) < 16:
            raise ConfigError(
                f"listening on {self.host} (not loopback) needs internal_token "
                "(CARDCORE_INTERNAL_TOKEN) of at least 16 characters"
            )
        return self

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


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
        values.update(_typed(document, f"config file {path}"))
    env = {
        f.name: environ[ENV_PREFIX + f.name.upper()]
        for f in fields(Config)
        if ENV_PREFIX + f.name.upper() in environ
    }
    values.update(_typed(env, "environment", from_text=True))
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
