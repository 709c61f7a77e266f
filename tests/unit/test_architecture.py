"""The import rules of ARCHITECTURE.md, checked on the source text (ast; nothing is imported).

Each check also runs on a small bad example, so a checker that stopped seeing anything would
fail here instead of passing silently.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cardcore"

# --- the rules, as tables ------------------------------------------------------------------

DOMAIN = "domain"
ADAPTER = "adapter"
SERVICE = "service"
ENTRYPOINT = "entrypoint"
SUPPORT = "support"  # configuration, logs, metrics: used by every layer but the domain
FEATURE = "feature"  # later roles (gateway, alliance) that reach the ledger through its API

LAYER_OF = {
    "cardcore": SUPPORT,  # the package itself: a docstring
    "cardcore.__main__": ENTRYPOINT,
    "cardcore.cli": ENTRYPOINT,
    "cardcore.bench": ENTRYPOINT,
    "cardcore.bench_pos": ENTRYPOINT,
    "cardcore.pos_commands": ENTRYPOINT,
    "cardcore.demo": ENTRYPOINT,  # demo data loaded by `cardcore serve --demo`
    "cardcore.api": ENTRYPOINT,
    "cardcore.api.app": ENTRYPOINT,
    "cardcore.api.edge": ENTRYPOINT,
    "cardcore.api.listener": ENTRYPOINT,
    "cardcore.api.server": ENTRYPOINT,
    "cardcore.ledger": SERVICE,  # the package: a docstring
    "cardcore.ledger.http": ENTRYPOINT,
    "cardcore.ledger.service": SERVICE,
    "cardcore.ledger.writer": SERVICE,
    "cardcore.limits": DOMAIN,
    "cardcore.ledger.model": DOMAIN,
    "cardcore.ledger.decide": DOMAIN,
    "cardcore.ledger.codes": DOMAIN,
    "cardcore.ledger.journal": DOMAIN,
    "cardcore.ledger.wire": DOMAIN,
    "cardcore.db": ADAPTER,
    "cardcore.migrate": ADAPTER,
    "cardcore.ledger.schema": ADAPTER,
    "cardcore.ledger.store": ADAPTER,
    "cardcore.config": SUPPORT,
    "cardcore.logs": SUPPORT,
    "cardcore.metrics": SUPPORT,
    "cardcore.runtime": SUPPORT,  # process settings of servers and load generators
    "cardcore.coalesce": SUPPORT,  # calls of one turn of the event loop answered together
    "cardcore.cards": SERVICE,  # the package: a docstring
    "cardcore.cards.model": DOMAIN,
    "cardcore.cards.schema": ADAPTER,
    "cardcore.cards.directory": ADAPTER,
    "cardcore.cards.pos": SERVICE,
    "cardcore.cards.admin": SERVICE,
    "cardcore.cards.http": ENTRYPOINT,
    "cardcore.cards.accounts": SERVICE,
    "cardcore.cards.pins": SERVICE,
    "cardcore.cards.terminals": SERVICE,
    "cardcore.cards.terminal_http": ENTRYPOINT,
    "cardcore.cards.service": SERVICE,
    "cardcore.cards.admin_http": ENTRYPOINT,
    "cardcore.vault": SUPPORT,  # secrets at rest: host services and the gateway's keys
    "cardcore.records": ADAPTER,
    "cardcore.api.routes": ENTRYPOINT,
    "cardcore.admin_commands": ENTRYPOINT,
    "cardcore.org": SERVICE,  # the package: a docstring
    "cardcore.org.model": DOMAIN,
    "cardcore.org.schema": ADAPTER,
    "cardcore.org.service": SERVICE,
    "cardcore.org.http": ENTRYPOINT,
    "cardcore.members": SERVICE,  # the package: a docstring
    "cardcore.members.model": DOMAIN,
    "cardcore.members.schema": ADAPTER,
    "cardcore.members.service": SERVICE,
    "cardcore.members.http": ENTRYPOINT,
    "cardcore.localtime": DOMAIN,
    "cardcore.points": SERVICE,  # the package: a docstring
    "cardcore.points.model": DOMAIN,
    "cardcore.points.schema": ADAPTER,
    "cardcore.points.service": SERVICE,
    "cardcore.points.http": ENTRYPOINT,
    "cardcore.coupons": SERVICE,  # the package: a docstring
    "cardcore.coupons.model": DOMAIN,
    "cardcore.coupons.schema": ADAPTER,
    "cardcore.coupons.service": SERVICE,
    "cardcore.coupons.http": ENTRYPOINT,
    "cardcore.service_cards": SERVICE,  # the package: a docstring
    "cardcore.service_cards.model": DOMAIN,
    "cardcore.service_cards.schema": ADAPTER,
    "cardcore.service_cards.service": SERVICE,
    "cardcore.service_cards.http": ENTRYPOINT,
    "cardcore.manager_cards": SERVICE,  # the package: a docstring
    "cardcore.manager_cards.model": DOMAIN,
    "cardcore.manager_cards.schema": ADAPTER,
    "cardcore.manager_cards.service": SERVICE,
    "cardcore.manager_cards.http": ENTRYPOINT,
    "cardcore.frontend_gateway": FEATURE,
    "cardcore.alliance": FEATURE,
}

# Which layers' modules a module of each layer may import (its own layer included).
MAY_IMPORT_LAYERS = {
    DOMAIN: {DOMAIN},
    SUPPORT: {DOMAIN, SUPPORT},
    ADAPTER: {DOMAIN, SUPPORT, ADAPTER},
    SERVICE: {DOMAIN, SUPPORT, ADAPTER, SERVICE},
    ENTRYPOINT: {DOMAIN, SUPPORT, ADAPTER, SERVICE, ENTRYPOINT, FEATURE},
    FEATURE: {SUPPORT, FEATURE},
}
# Features know the ledger only through its API types, never its tables or writer.
FEATURE_MAY_IMPORT = {
    "cardcore.limits",
    "cardcore.ledger.wire",
    "cardcore.ledger.model",
    "cardcore.ledger.codes",
    "cardcore.cards.model",  # the POS request and answer types of the host API
}

# Every third-party package cardcore may import, and where.
ONLY_ADAPTERS = frozenset(m for m, layer in LAYER_OF.items() if layer == ADAPTER)
THIRD_PARTY = {
    "sqlalchemy": ONLY_ADAPTERS,
    "alembic": frozenset({"cardcore.migrate"}),
    "aiohttp": frozenset(
        {
            "cardcore.api.app",
            "cardcore.api.edge",
            "cardcore.api.listener",
            "cardcore.ledger.http",
            "cardcore.cards.http",
            "cardcore.cards.admin_http",
            "cardcore.cards.terminal_http",
            "cardcore.org.http",
            "cardcore.members.http",
            "cardcore.points.http",
            "cardcore.coupons.http",
            "cardcore.service_cards.http",
            "cardcore.manager_cards.http",
            "cardcore.api.routes",
            "cardcore.admin_commands",
            "cardcore.bench",
            "cardcore.bench_pos",
            "cardcore.pos_commands",
            "cardcore.frontend_gateway",  # the HTTP host adapter and the metrics endpoint
        }
    ),
    "prometheus_client": frozenset({"cardcore.metrics", "cardcore.api.app"}),
    "asyncpg": ONLY_ADAPTERS,  # drivers: reached through SQLAlchemy URLs today
    "aiosqlite": ONLY_ADAPTERS,
    # PIN blocks and terminal keys; sealing, keyed hashes and PIN verification values
    "cryptography": frozenset({"cardcore.frontend_gateway", "cardcore.vault"}),
    "jsonschema": frozenset({"cardcore.api.routes"}),  # admin request bodies, one schema
    "uvloop": frozenset({"cardcore.runtime"}),  # the long-running processes' loop (ADR 0009)
}
DOMAIN_FORBIDDEN = {"asyncio", "aiohttp", "sqlalchemy", "asyncpg", "aiosqlite", "cryptography"}
DOMAIN_FILES = ["model.py", "decide.py", "codes.py", "journal.py", "wire.py"]

# --- reading the source --------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, fully qualified module) of every import, at any depth (also inside functions).
    `from cardcore import limits` yields `cardcore.limits` when that is a module."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "__future__":
                continue
            named = [f"{base}.{alias.name}" for alias in node.names]
            submodules = [n for n in named if _is_module(n)]
            yield from ((node.lineno, n) for n in (submodules or [base]))


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _owner(name: str) -> str | None:
    """The entry of LAYER_OF that `name` belongs to (a module, or the package above it)."""
    while name != "cardcore":  # the package's own entry covers only its __init__
        if name in LAYER_OF:
            return name
        name = name.rpartition(".")[0]
    return name if name in LAYER_OF else None


def violations(path: Path, source: str) -> list[str]:
    """Every import in `source` (the text of the module at `path`) that the tables forbid."""
    module = module_name(path)
    owner = _owner(module)
    if owner is None or (module != owner and LAYER_OF[owner] != FEATURE):
        return [f"{module}: not in LAYER_OF; give it a layer"]
    layer = LAYER_OF[owner]
    found = []
    for line, name in imports(source, module, path.name == "__init__.py"):
        top = name.partition(".")[0]
        where = f"{module}:{line} imports {name}"
        if top == "cardcore":
            target = _owner(name)
            if target is None:
                found.append(f"{where}: not in LAYER_OF")
            elif layer == FEATURE and target in FEATURE_MAY_IMPORT:
                continue
            elif LAYER_OF[target] not in MAY_IMPORT_LAYERS[layer]:
                found.append(f"{where}: {layer} may not import {LAYER_OF[target]}")
        elif top in THIRD_PARTY:
            if owner not in THIRD_PARTY[top]:
                found.append(f"{where}: only {sorted(THIRD_PARTY[top])} may")
        elif top not in sys.stdlib_module_names:
            found.append(f"{where}: third-party package missing from THIRD_PARTY")
        elif layer == DOMAIN and top in DOMAIN_FORBIDDEN:
            found.append(f"{where}: the domain is pure")
    return found


# --- the checks ----------------------------------------------------------------------------


def test_every_module_imports_only_what_its_layer_may() -> None:
    assert len(sources()) > 20
    found = [v for path in sources() for v in violations(path, path.read_text())]
    assert not found, "\n".join(found)


def test_the_layer_check_sees_forbidden_imports() -> None:
    def check(file: str, source: str) -> list[str]:
        return violations(PACKAGE / file, source)

    assert check("ledger/model.py", "import asyncio\n")
    assert check("ledger/decide.py", "from cardcore.ledger import store\n")
    assert check("ledger/wire.py", "from sqlalchemy import text\n")
    assert check("ledger/service.py", "def f():\n    from aiohttp import web\n")
    assert check("ledger/store.py", "from cardcore.ledger.writer import Writer\n")
    assert check("frontend_gateway/__init__.py", "from cardcore.ledger import schema\n")
    assert check("limits.py", "import numpy\n")
    assert check("ledger/new_module.py", "")
    assert check("ledger/wire.py", "from cardcore.ledger import unknown_module\n")
    assert not check("ledger/store.py", "from sqlalchemy import select\nimport json\n")
    assert not check("frontend_gateway/iso8583.py", "from cardcore.ledger.wire import encode_op\n")


@pytest.mark.parametrize("file", DOMAIN_FILES)
def test_domain_module_imports_no_io_framework(file: str) -> None:
    path = PACKAGE / "ledger" / file
    names = {name for _, name in imports(path.read_text(), module_name(path))}
    assert names  # the file was read and has imports
    assert {n.partition(".")[0] for n in names} & DOMAIN_FORBIDDEN == set()


def test_ledger_and_cards_never_import_the_frontend_gateway() -> None:
    """The entrypoints that assemble both may (`cards/http.py` registers terminals with the
    gateway's key functions); the ledger and the cards' services, domain and adapters not."""
    paths = [*(PACKAGE / "ledger").rglob("*.py"), *(PACKAGE / "cards").rglob("*.py")]
    for path in sorted(p for p in paths if not p.name.endswith("http.py")):
        for line, name in imports(path.read_text(), module_name(path)):
            assert not name.startswith("cardcore.frontend_gateway"), f"{path}:{line}"
    bad = "from cardcore.frontend_gateway import iso8583\n"
    assert [n for _, n in imports(bad, "cardcore.ledger.x")] == ["cardcore.frontend_gateway"]


def float_uses(source: str) -> list[int]:
    """Lines where `float` is called or used in an annotation (strings included)."""
    tree = ast.parse(source)
    annotations: list[ast.expr] = []
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "float":
                lines.append(node.lineno)
        elif isinstance(node, ast.AnnAssign | ast.arg) and node.annotation is not None:
            annotations.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            annotations.append(node.returns)
    for annotation in annotations:
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            inner: ast.AST = ast.parse(annotation.value, mode="eval")
        else:
            inner = annotation
        if any(isinstance(n, ast.Name) and n.id == "float" for n in ast.walk(inner)):
            lines.append(annotation.lineno)
    return sorted(lines)


def test_ledger_code_has_no_float() -> None:
    files = sorted((PACKAGE / "ledger").rglob("*.py")) + sorted((PACKAGE / "cards").rglob("*.py"))
    assert len(files) >= len(DOMAIN_FILES)
    found = [f"{p.relative_to(ROOT)}:{line}" for p in files for line in float_uses(p.read_text())]
    assert not found, "float in ledger code at " + ", ".join(found)


def test_the_float_check_sees_calls_and_annotations() -> None:
    assert float_uses("x = float(1)\n") == [1]
    assert float_uses("amount: float = 0\n") == [1]
    assert float_uses("def f(a: 'list[float]') -> int: ...\n") == [1]
    assert float_uses("def f(a: int) -> float | None: ...\n") == [1]
    assert float_uses("purpose = 'float'\nx: int = 1\n") == []


UNIT_SUFFIXES = ("_MAX", "_MIN", "_S", "_MS", "_BYTES", "_DEFAULT", "_CEILING", "_BATCHES")


def constant_values(source: str) -> dict[str, object]:
    """Module-level UPPER_CASE constants, evaluated from int literals and + - * // ** only;
    anything else (a float literal, `/`) evaluates to a float or fails loudly."""

    def value(node: ast.expr) -> object:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            operand = value(node.operand)
            assert isinstance(operand, int | float)
            return -operand
        if isinstance(node, ast.BinOp):
            left, right = value(node.left), value(node.right)
            assert isinstance(left, int | float) and isinstance(right, int | float)
            match node.op:
                case ast.Add():
                    return left + right
                case ast.Sub():
                    return left - right
                case ast.Mult():
                    return left * right
                case ast.FloorDiv():
                    return left // right
                case ast.Div():
                    return left / right
                case ast.Pow():
                    return left**right
        raise AssertionError(f"line {node.lineno}: not a plain constant: {ast.dump(node)}")

    out = {}
    for node in ast.parse(source).body:
        target: ast.expr | None = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id.isupper():
            assert isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
            out[target.id] = value(node.value)
    return out


def test_every_limit_is_an_int_named_with_its_unit_last() -> None:
    values = constant_values((PACKAGE / "limits.py").read_text())
    assert len(values) > 20
    assert [n for n in values if not n.endswith(UNIT_SUFFIXES)] == []
    not_int = {n: v for n, v in values.items() if type(v) is not int}
    assert not_int == {}


def test_the_limits_check_sees_floats() -> None:
    values = constant_values("A_S: Final = 1.5\nB_MS = 10 / 2\nC_MAX = 2**63 - 1\nlower = 0.5\n")
    assert values == {"A_S": 1.5, "B_MS": 5.0, "C_MAX": 2**63 - 1}
    assert [n for n, v in values.items() if type(v) is not int] == ["A_S", "B_MS"]


def test_make_clean_never_removes_the_data_folder() -> None:
    """data/ holds the embedded database, its key-encrypting key and the store-and-forward
    file: `make clean` removed it with the caches (an operations review)."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nclean:\n", 1)[1].split("\n\n", 1)[0]
    assert "rm -rf" in recipe
    assert "data" not in recipe.split(), recipe
