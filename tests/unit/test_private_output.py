"""`admin_commands.private_output`: the file full card numbers and coupon codes go to."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cardcore.admin_commands import private_output


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


def test_a_failure_leaves_the_old_file_whole_and_success_makes_it_private(
    tmp_path: Path,
) -> None:
    old = tmp_path / "cards.csv"
    old.write_text("the last print run\n")
    old.chmod(0o644)
    with pytest.raises(RuntimeError):
        _write_then_fail(old)
    assert old.read_text() == "the last print run\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cards.csv"]  # no temporary file left
    with private_output(old) as handle:
        handle.write("card_number\n")
    assert old.read_text() == "card_number\n"
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_what_stands_is_kept_when_asked(tmp_path: Path) -> None:
    """Codes committed chunk by chunk stay in the file when a later chunk fails."""
    out = tmp_path / "codes.csv"
    with pytest.raises(RuntimeError):
        _write_then_fail(out, keep=True)
    assert out.read_text() == "half of a new one\n"
