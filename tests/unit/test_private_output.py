"""`admin_commands.private_output`: the file full card numbers and coupon codes go to."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cardcore.admin_commands import AdminCommandError, private_output


def _write_then_fail(path: Path, *, keep: bool = False) -> None:
    with private_output(path, keep=lambda: keep) as handle:
        handle.write("half of a new one\n")
        raise RuntimeError("the issuance failed")


def _enter(path: Path) -> None:
    with private_output(path):
        pass


def test_a_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        _enter(tmp_path)


def test_an_existing_file_is_refused_before_any_work_and_kept_whole(tmp_path: Path) -> None:
    """An earlier print run's file may hold the only copy of its full numbers: it is never
    replaced (it was, by a later run with the same --out)."""
    old = tmp_path / "cards.csv"
    old.write_text("the last print run\n")
    with pytest.raises(FileExistsError):
        _enter(old)
    (tmp_path / "link.csv").symlink_to(tmp_path / "nowhere.csv")
    with pytest.raises(FileExistsError):
        _enter(tmp_path / "link.csv")
    assert old.read_text() == "the last print run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cards.csv", "link.csv"]


def test_a_failure_leaves_nothing_and_success_makes_a_private_file(tmp_path: Path) -> None:
    new = tmp_path / "cards.csv"
    with pytest.raises(RuntimeError):
        _write_then_fail(new)
    assert list(tmp_path.iterdir()) == []  # no temporary file left
    with private_output(new) as handle:
        handle.write("card_number\n")
    assert new.read_text() == "card_number\n"
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["cards.csv"]


def test_a_file_made_meanwhile_is_not_replaced_and_the_run_keeps_its_own(tmp_path: Path) -> None:
    out = tmp_path / "cards.csv"

    def made_meanwhile() -> None:
        with private_output(out) as handle:
            handle.write("this run's numbers\n")
            out.write_text("someone else's\n")

    with pytest.raises(AdminCommandError, match="made by someone else") as caught:
        made_meanwhile()
    assert out.read_text() == "someone else's\n"
    [kept] = [p for p in tmp_path.iterdir() if p != out]
    assert str(kept) in str(caught.value)
    assert kept.read_text() == "this run's numbers\n"


def test_what_stands_is_kept_when_asked(tmp_path: Path) -> None:
    """Codes committed chunk by chunk stay in the file when a later chunk fails."""
    out = tmp_path / "codes.csv"
    with pytest.raises(RuntimeError):
        _write_then_fail(out, keep=True)
    assert out.read_text() == "half of a new one\n"


def test_a_file_system_without_hard_links_keeps_the_run_and_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file goes in place by a hard link; where there are none the error was a raw
    OSError after the cards stood, naming nothing (a review)."""

    def no_links(_src: str, _dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("cardcore.admin_commands.os.link", no_links)
    out = tmp_path / "cards.csv"

    def write() -> None:
        with private_output(out) as handle:
            handle.write("this run's numbers\n")

    with pytest.raises(AdminCommandError, match="could not be put in place") as caught:
        write()
    [kept] = list(tmp_path.iterdir())
    assert str(kept) in str(caught.value) and kept.read_text() == "this run's numbers\n"
