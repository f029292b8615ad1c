"""Stop strings over streamed byte-level BPE text: where an answer ends and what may not be shown yet."""

from __future__ import annotations

from typing import Callable


def find_stop(text: str, stop_strings: list[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stop_strings) if index >= 0]
    return min(found) if found else None


def first_prefix_with_stop(ids: list[int], has_stop: Callable[[list[int]], bool]) -> int:
    """The fewest leading tokens whose text already contains a stop string (binary search: the test is monotone)."""
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        if has_stop(ids[:middle]):
            high = middle
        else:
            low = middle + 1
    return high


def held_back(text: str, stop_strings: list[str]) -> int:
    """How many trailing characters could still grow into a stop string (or finish a multi-byte character)."""
    hold = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from byte-level BPE
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold
