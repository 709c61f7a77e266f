"""`cardcore/ledger/wire.py` (operations to JSON and back, result shapes) and
`cardcore/config.py` (precedence, types, the listen-address rule). Pure: no I/O but tmp files."""

from __future__ import annotations

import json
import string
import typing
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcore import limits
from cardcore.config import Config, ConfigError, load, load_kek
from cardcore.ledger import codes, wire
from cardcore.ledger.model import (
    LEDGER_CLIENT,
    METADATA_NAMES,
    AccountFlags,
    AssetKind,
    CreateAccount,
    CreateAsset,
    CreateTransfer,
    ExpirePending,
    Op,
    Posting,
    PostPending,
    Refund,
    Result,
    Reverse,
    SetAccountFrozen,
    Side,
    VoidPending,
)

# --- wire: operations ----------------------------------------------------------------------


def through_json(op: Op, client: str) -> Op:
    """What a server parses from what a client encoded and sent as JSON text."""
    sent = json.dumps(wire.encode_op(op), ensure_ascii=False)
    return wire.parse_op(json.loads(sent), "ops[0]", client)


EXAMPLES: dict[str, Op] = {
    "asset": CreateAsset("CNY", AssetKind.CURRENCY, 2, "Renminbi (fen)"),
    "asset linked": CreateAsset("PTS", AssetKind.POINTS, 0, "Group points", linked=True),
    "account": CreateAccount("CNY", "LE-A", "card", "C0001", "stored_value"),
    "account with flags": CreateAccount(
        "CNY",
        "LE-A",
        "card",
        "C0002",
        "gift",
        AccountFlags(no_overdraft=True, debit_frozen=True),
        linked=True,
    ),
    "freeze debits": SetAccountFrozen(7, debit_frozen=True),
    "unfreeze credits": SetAccountFrozen(7, credit_frozen=False),
    "set both flags": SetAccountFrozen(limits.BALANCE_MAX, True, False, linked=True),
    "transfer": CreateTransfer(
        "pos", "k1", "CNY", (Posting(1, Side.DEBIT, 5), Posting(2, Side.CREDIT, 5))
    ),
    "hold": CreateTransfer(
        "pos",
        "k2",
        "CNY",
        (Posting(2, Side.CREDIT, 9), Posting(1, Side.DEBIT, 9)),
        pending=True,
        timeout_s=limits.PENDING_TIMEOUT_S_MAX,
        reason="auth",
        metadata=(("rrn", "123456789012"), ("store", "S1")),
    ),
    "post all": PostPending("pos", "k3", 12),
    "post part": PostPending(
        "pos", "k4", 12, amount=3, reason="capture", metadata=(("stan", "1"),), linked=True
    ),
    "void": VoidPending("pos", "k5", 12),
    "void with reason": VoidPending("pos", "k6", 12, "cancel", (("operator", "op-7"),)),
    "reverse": Reverse("pos", "k7", "k1"),
    "reverse or tombstone": Reverse(
        "pos", "k8", "k1", tombstone=True, reason="reversal", metadata=(("stan", "2"),)
    ),
    "void of the whole": Reverse("pos", "k10", "k1", reason="void", whole=True),
    "refund": Refund("pos", "k9", "k1", 3, "refund", linked=True),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_op_kind_reads_back_as_itself(name: str) -> None:
    op = EXAMPLES[name]
    client = getattr(op, "client", "pos")
    assert through_json(op, client) == op


def test_the_examples_cover_every_op_a_client_can_send() -> None:
    sendable = set(typing.get_args(Op)) - {ExpirePending}
    assert len(sendable) == 8
    assert {type(op) for op in EXAMPLES.values()} == sendable


def test_the_ledgers_own_ops_cannot_be_encoded() -> None:
    with pytest.raises(TypeError, match="ExpirePending"):
        wire.encode_op(ExpirePending(12))


def _text(alphabet: str, low: int, high: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=low, max_size=high)


NAME_CHARS = string.ascii_letters + string.digits + "._:-"
amounts = st.integers(1, limits.AMOUNT_MAX)
metadata_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\u2028\u2029"),
    min_size=1,
    max_size=limits.METADATA_VALUE_CHARS_MAX,
)


@st.composite
def balanced_postings(draw: st.DrawFn) -> tuple[Posting, ...]:
    """Debits and credits with equal totals, each amount in range, accounts distinct; one
    credit may be split in two (a three-legged transfer)."""
    debits = draw(st.lists(amounts, min_size=1, max_size=limits.POSTINGS_PER_TRANSFER_MAX // 2))
    credits = list(debits)
    if (
        credits[0] > 1
        and len(debits) * 2 < limits.POSTINGS_PER_TRANSFER_MAX
        and draw(st.booleans())
    ):
        part = draw(st.integers(1, credits[0] - 1))
        credits[0:1] = [part, credits[0] - part]
    ids = draw(
        st.lists(
            st.integers(1, limits.BALANCE_MAX),
            min_size=len(debits) + len(credits),
            max_size=len(debits) + len(credits),
            unique=True,
        )
    )
    legs = [Posting(a, Side.DEBIT, x) for a, x in zip(ids, debits, strict=False)]
    legs += [Posting(a, Side.CREDIT, x) for a, x in zip(ids[len(debits) :], credits, strict=True)]
    return tuple(draw(st.permutations(legs)))


@st.composite
def transfers(draw: st.DrawFn) -> CreateTransfer:
    pending = draw(st.booleans())
    timeout = st.none() | st.integers(1, limits.PENDING_TIMEOUT_S_MAX) if pending else st.none()
    metadata = draw(st.dictionaries(st.sampled_from(sorted(METADATA_NAMES)), metadata_values))
    return CreateTransfer(
        client=draw(
            _text(string.ascii_letters + string.digits + "._-", 1, limits.CLIENT_CHARS_MAX).filter(
                lambda c: c != LEDGER_CLIENT  # the writer's own name: refused from callers
            )
        ),
        key=draw(_text(NAME_CHARS + "/+=", 1, limits.KEY_CHARS_MAX)),
        asset=draw(
            _text(string.ascii_uppercase + string.digits + "._:-", 1, limits.ASSET_CODE_CHARS_MAX)
        ),
        postings=draw(balanced_postings()),
        pending=pending,
        timeout_s=draw(timeout),
        reason=draw(_text(NAME_CHARS, 0, limits.REASON_CHARS_MAX)),
        metadata=tuple(sorted(metadata.items())),
        linked=draw(st.booleans()),
    )


@given(transfers())
def test_any_valid_transfer_reads_back_as_itself(op: CreateTransfer) -> None:
    assert through_json(op, op.client) == op


@given(transfers())
def test_a_request_of_encoded_transfers_parses_to_the_same_ops(op: CreateTransfer) -> None:
    last = CreateTransfer(op.client, op.key + "-last", op.asset, op.postings)
    body = {"client": op.client, "ops": [wire.encode_op(op), wire.encode_op(last)]}
    assert wire.parse_ops_request(json.loads(json.dumps(body))) == (op.client, [op, last])


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"colour": "red"}, "unknown_field", "ops[0].colour"),
        ({"postings": [{"account_id": 1, "side": "debit", "amount": 5}]}, "too_few_postings", None),
        ({"timeout_s": 60}, "invalid_value", "ops[0].timeout_s"),
        ({"metadata": {"store": "S1\n"}}, "invalid_characters", "ops[0].metadata.store"),
        ({"key": "k" * (limits.KEY_CHARS_MAX + 1)}, "string_too_long", "ops[0].key"),
        ({"key": ""}, "empty_string", "ops[0].key"),
        ({"op": 5}, "wrong_type", "ops[0].op"),
        ({"op": "teleport"}, "invalid_value", "ops[0].op"),
    ],
)
def test_a_bad_field_is_refused_with_its_code_and_path(
    change: dict[str, object], code: str, field: str | None
) -> None:
    op = wire.encode_op(EXAMPLES["transfer"]) | change
    with pytest.raises(wire.RequestError) as refused:
        wire.parse_ops_request({"client": "pos", "ops": [op]})
    assert refused.value.code == code
    assert refused.value.field == (field or "ops[0].postings")


def test_the_writers_own_client_name_and_a_target_that_is_its_own_key_are_refused() -> None:
    """Client `ledger` is the writer's (its hold expiries' keys): a caller's transfer under it
    could take an expiry's key. A reverse or refund naming its own key as target would write
    two records under that key."""
    op = wire.encode_op(EXAMPLES["transfer"])
    with pytest.raises(wire.RequestError) as refused:
        wire.parse_ops_request({"client": LEDGER_CLIENT, "ops": [op]})
    assert (refused.value.code, refused.value.field) == ("invalid_value", "client")
    for name in ("reverse", "refund"):
        own = wire.encode_op(EXAMPLES[name])
        own["target_key"] = own["key"]
        with pytest.raises(wire.RequestError) as refused:
            wire.parse_ops_request({"client": "pos", "ops": [own]})
        assert (refused.value.code, refused.value.field) == ("invalid_value", "ops[0].target_key")


def test_an_amount_that_is_a_bool_or_too_large_is_refused() -> None:
    for amount, code in ((True, "wrong_type"), (limits.AMOUNT_MAX + 1, "amount_too_large")):
        op = wire.encode_op(EXAMPLES["post all"]) | {"amount": amount}
        with pytest.raises(wire.RequestError) as refused:
            wire.parse_op(op, "ops[0]", "pos")
        assert (refused.value.code, refused.value.field) == (code, "ops[0].amount")


# --- wire: results -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "shape"),
    [
        (
            Result(ok=True, code="ok", seq=3, transfer_id=7),
            {"status": "ok", "code": "ok", "seq": 3, "transfer_id": 7},
        ),
        (
            Result(ok=True, code="ok", seq=1, account_id=4, replayed=True),
            {"status": "ok", "code": "ok", "seq": 1, "account_id": 4, "replayed": True},
        ),
        (
            Result(ok=True, code="ok", seq=1, asset="CNY"),
            {"status": "ok", "code": "ok", "seq": 1, "asset": "CNY"},
        ),
        (
            Result(ok=False, code="exceeds_credits", field="postings[0].account_id"),
            {
                "status": "failed",
                "code": "exceeds_credits",
                "field": "postings[0].account_id",
                "message": "insufficient funds: debits would exceed credits",
            },
        ),
        (
            Result(ok=False, code="id_already_failed", original_code="exceeds_credits"),
            {
                "status": "failed",
                "code": "id_already_failed",
                "original_code": "exceeds_credits",
                "message": codes.MESSAGES["exceeds_credits"],
            },
        ),
        (
            Result(ok=False, code="linked_event_failed"),
            {
                "status": "failed",
                "code": "linked_event_failed",
                "message": codes.MESSAGES["linked_event_failed"],
            },
        ),
    ],
)
def test_result_json_has_the_documented_shape(result: Result, shape: dict[str, object]) -> None:
    rendered = wire.result_json(result)
    assert rendered == shape
    assert json.loads(json.dumps(rendered)) == shape


def test_every_documented_code_has_a_message() -> None:
    assert codes.MESSAGES.keys() >= codes.PERSISTED_FAILURES
    assert all(codes.message(code) for code in codes.MESSAGES)


# --- config --------------------------------------------------------------------------------


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cardcore.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_an_embedded_loopback_server() -> None:
    config = load(None, environ={})
    assert config == Config()
    assert (config.host, config.port, config.internal_token) == ("127.0.0.1", 8080, "")
    assert config.db_url.startswith("sqlite:///")
    assert config.check() is config


def test_toml_overrides_defaults_and_env_overrides_toml(tmp_path: Path) -> None:
    path = toml(tmp_path, 'db_url = "postgresql://c@db/c"\nport = 9000\nlog_level = "DEBUG"\n')
    from_file = load(path, environ={})
    assert (from_file.db_url, from_file.port, from_file.log_level) == (
        "postgresql://c@db/c",
        9000,
        "DEBUG",
    )
    assert from_file.host == Config().host  # what the file does not name keeps its default

    env = {"CARDCORE_PORT": "9100", "CARDCORE_BATCH_WAIT_MS_MAX": "5", "OTHER_PORT": "1"}
    both = load(path, environ=env)
    assert (both.port, both.batch_wait_ms_max, both.db_url) == (9100, 5, "postgresql://c@db/c")


def test_a_mistyped_variable_is_refused_and_the_test_suites_own_are_not_settings() -> None:
    """CARDCORE_DATABASE_URL (for CARDCORE_DB_URL) was ignored: `migrate` made a new empty
    database in the working folder (an operations review)."""
    with pytest.raises(ConfigError, match="environment: unknown setting CARDCORE_DATABASE_URL"):
        load(None, environ={"CARDCORE_DATABASE_URL": "postgresql://u@db/x"})
    quiet = {"CARDCORE_TEST_PG_URL": "postgresql://u@db/t", "CARDCORE_CONFIG": "", "PATH": "/"}
    assert load(None, environ=quiet) == Config()


def test_the_environments_key_wins_over_the_files_either_way(tmp_path: Path) -> None:
    """A TOML `kek` beat CARDCORE_KEK_FILE (kek is read before kek_file): the documented
    order is defaults < TOML < environment < flags, for the key as for the rest."""
    file_key, env_key = "a" * 64, "b" * 64
    kek_file = tmp_path / "kek"
    kek_file.write_text(env_key + "\n")
    path = toml(tmp_path, f'kek = "{file_key}"\n')
    assert load_kek(load(path, environ={})) == bytes.fromhex(file_key)
    from_env = load(path, environ={"CARDCORE_KEK_FILE": str(kek_file)})
    assert load_kek(from_env) == bytes.fromhex(env_key)
    path = toml(tmp_path, f'kek_file = "{tmp_path / "nowhere"}"\n')
    assert load_kek(load(path, environ={"CARDCORE_KEK": env_key})) == bytes.fromhex(env_key)


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = toml(tmp_path, "port = 9300\n")
    assert load(None, environ={"CARDCORE_CONFIG": path}).port == 9300
    assert load(path, environ={"CARDCORE_CONFIG": "/nonexistent.toml"}).port == 9300


def test_flags_override_everything_but_only_when_given() -> None:
    config = load(None, environ={"CARDCORE_PORT": "9100", "CARDCORE_HOST": "::1"})
    overridden = config.with_overrides({"port": 9200, "host": None, "db_url": None})
    assert (overridden.port, overridden.host, overridden.db_url) == (9200, "::1", config.db_url)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('port = "9000"', "port must be an integer"),
        ("port = true", "port must be an integer"),
        ("port = 80.5", "port must be an integer"),
        ("batch_size_max = [1]", "batch_size_max must be an integer"),
        ("host = 127", "host must be a string"),
        ("internal_token = false", "internal_token must be a string"),
        ('colour = "red"', "unknown setting 'colour'"),
        ("port = ", "not valid TOML"),
    ],
)
def test_a_wrong_type_in_the_file_is_refused_naming_the_setting(
    tmp_path: Path, text: str, message: str
) -> None:
    path = toml(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=message) as refused:
        load(path, environ={})
    assert path in str(refused.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("CARDCORE_PORT", "eighty"), ("CARDCORE_PORT", "80.0"), ("CARDCORE_QUEUE_REQUESTS_MAX", "")],
)
def test_a_wrong_type_in_the_environment_is_refused_naming_the_setting(
    name: str, value: str
) -> None:
    setting = name.removeprefix("CARDCORE_").lower()
    with pytest.raises(ConfigError, match=f"environment: {setting} must be an integer"):
        load(None, environ={name: value})


def test_missing_config_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.toml"):
        load(missing, environ={})


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "db1.example.com"])
def test_a_non_loopback_host_needs_a_token_of_16_characters(host: str) -> None:
    for token in ("", "x" * 15):
        with pytest.raises(ConfigError, match="CARDCORE_INTERNAL_TOKEN"):
            Config(host=host, internal_token=token).check()
    assert Config(host=host, internal_token="x" * 16).check().host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_a_loopback_host_needs_no_token(host: str) -> None:
    assert Config(host=host).check().host == host


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("port", 0, "port must be 1..65535"),
        ("port", 65536, "port must be 1..65535"),
        ("batch_size_max", limits.BATCH_SIZE_MAX_CEILING + 1, "batch_size_max must be"),
        ("batch_wait_ms_max", -1, "batch_wait_ms_max must be"),
        ("queue_requests_max", 0, "queue_requests_max must be"),
        ("log_format", "xml", "log_format must be json or text"),
        ("log_level", "LOUD", "log_level"),
        ("gateway_terminal_rate_per_s", 0, "gateway_terminal_rate_per_s must be 1..1000"),
        ("gateway_terminal_rate_per_s", limits.GATEWAY_TERMINAL_RATE_PER_S_MAX + 1, "1..1000"),
    ],
)
def test_check_refuses_a_value_out_of_range(setting: str, value: object, message: str) -> None:
    config = Config().with_overrides({setting: value})
    with pytest.raises(ConfigError, match=message):
        config.check()


def test_a_postgresql_url_with_libpq_sslmode_asks_asyncpg_for_ssl() -> None:
    """`?sslmode=require` (libpq's spelling, what operators write) is asyncpg's `ssl`: it
    failed with a TypeError from the driver."""
    from cardcore.db import async_url  # noqa: PLC0415

    url = async_url("postgresql://u@db.example/cards?sslmode=require")
    assert (url.drivername, dict(url.query)) == ("postgresql+asyncpg", {"ssl": "require"})


def test_a_postgresql_url_takes_libpq_connect_timeout_and_application_name() -> None:
    """libpq's `connect_timeout` and `application_name` (common in operators' URLs) were
    handed to asyncpg, which failed with a traceback; now they set the connection's timeout
    and name."""
    from cardcore.db import async_url, make_engine  # noqa: PLC0415

    url = "postgresql://u@db.example/cards?connect_timeout=5&application_name=hq-ledger"
    assert dict(async_url(url).query) == {"timeout": "5", "application_name": "hq-ledger"}
    engine = make_engine(url)
    try:
        _, params = engine.sync_engine.dialect.create_connect_args(engine.url)
        assert "application_name" not in params and "timeout" not in params
        assert engine.pool.timeout() == 5  # type: ignore[attr-defined]  # QueuePool's
    finally:
        engine.sync_engine.dispose()


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("options=-c%20x", "parameter 'options' is not one of"),
        ("password=hunter2", "parameter 'password' is not one of"),
        ("sslmode=require&ssl=disable", "given twice"),
        ("connect_timeout=0", "connect_timeout is 1..300"),
        ("connect_timeout=soon", "connect_timeout is 1..300"),
        ("connect_timeout=%C2%B2", "connect_timeout is 1..300"),  # a digit, but not ASCII
    ],
)
def test_a_postgresql_url_parameter_asyncpg_cannot_take_is_refused_by_name(
    query: str, says: str
) -> None:
    from cardcore.db import DatabaseUrlError, async_url  # noqa: PLC0415

    with pytest.raises(DatabaseUrlError, match=says) as refused:
        async_url(f"postgresql://u@db.example/cards?{query}")
    assert "hunter2" not in str(refused.value)


def test_a_config_file_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path) -> None:
    """A Latin-1 comment gave a UnicodeDecodeError traceback."""
    path = tmp_path / "cardcore.toml"
    path.write_bytes("# caf\xe9\nport = 8081\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load(str(path), environ={})


def test_a_kek_file_others_may_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The key opens every card number and terminal key: a file of mode 0644 was taken
    without a word (an operations review)."""
    path = tmp_path / "kek"
    path.write_text("ab" * 32 + "\n")
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="cardcore.config"):
        assert load_kek(Config(kek_file=str(path))) == bytes.fromhex("ab" * 32)
    assert [r.getMessage() for r in caplog.records] == [
        "kek_file is readable by others than its owner"
    ]
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="cardcore.config"):
        load_kek(Config(kek_file=str(path)))
    assert caplog.records == []
