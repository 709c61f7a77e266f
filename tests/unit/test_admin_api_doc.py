"""docs/admin-api.md says what the code does: its permission table is PERMISSIONS and its
route index is the admin route table, row for row. Regenerate them with
`python -m tests.unit.test_admin_api_doc` and paste them in."""

from __future__ import annotations

from pathlib import Path

from cardcore.api.app import ADMIN_ROUTES
from cardcore.org.model import PERMISSIONS, Perm, Role

DOC = Path(__file__).resolve().parents[2] / "docs" / "admin-api.md"


def permission_table() -> str:
    roles = list(Role)
    lines = [
        "| permission | " + " | ".join(r.value for r in roles) + " |",
        "|---|" + "---|" * len(roles),
    ]
    for p in Perm:
        marks = " | ".join("yes" if p in PERMISSIONS[r] else "" for r in roles)
        lines.append(f"| `{p.value}` | {marks} |")
    return "\n".join(lines)


def route_index() -> str:
    lines = ["| method | path | permission | what it does |", "|---|---|---|---|"]
    for r in ADMIN_ROUTES:
        perm = f"`{r.perm}`" if r.perm else "none"
        lines.append(f"| {r.method} | `{r.path}` | {perm} | {r.summary} |")
    return "\n".join(lines)


def test_the_permission_table_is_the_code() -> None:
    assert permission_table() in DOC.read_text(encoding="utf-8")


def test_the_route_index_is_the_route_table() -> None:
    assert route_index() in DOC.read_text(encoding="utf-8")


def test_every_route_names_a_known_permission_and_documents_its_answers() -> None:
    known = {p.value for p in Perm}
    for r in ADMIN_ROUTES:
        assert r.perm in known, (r.method, r.path)
        assert r.answers, (r.method, r.path)
        assert all(status < 300 for status in r.answers), (r.method, r.path)


if __name__ == "__main__":
    print(permission_table())  # noqa: T201 - the tool's output
    print()  # noqa: T201
    print(route_index())  # noqa: T201
