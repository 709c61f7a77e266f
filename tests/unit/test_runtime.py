"""settle_gc: start-up objects frozen, the young threshold raised, later cycles collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from cardcore import limits
from cardcore.runtime import settle_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.mark.usefixtures("restored_gc")
def test_settle_gc_freezes_start_up_and_still_collects_later_cycles() -> None:
    _, older, oldest = gc.get_threshold()
    settle_gc()
    assert gc.get_threshold() == (limits.GC_YOUNG_OBJECTS_MAX, older, oldest)
    assert gc.get_freeze_count() > 0
    # A cycle made after start-up, then dropped: the collector finds it once enough new
    # objects were made, with nobody calling gc.collect().
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None
    kept: list[list[int]] = [[] for _ in range(limits.GC_YOUNG_OBJECTS_MAX * 2)]
    assert gone() is None
    assert len(kept) == limits.GC_YOUNG_OBJECTS_MAX * 2
