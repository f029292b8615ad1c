"""Stop strings over streamed byte-level BPE text: where an answer ends and what may not be shown yet.

`TextPieces` follows one answer token by token (every row of the decode loop has one), so a streamed answer is cut
and shown the same way everywhere. The pieces concatenate to exactly the final `Result.text`: text that might still
become a stop string, or an unfinished UTF-8 character, is held back until it is settled.
"""

from __future__ import annotations

from typing import Callable, Iterable


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


class TextPieces:
    """One growing answer: `add` a token, get the newly settled text; `ended` once a stop token or string came.

    With `show=False` (a non-streaming row) the text is only decoded when there are stop strings to look for.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Iterable[int], stop_strings: list[str],
                 show: bool = True):
        self.decode, self.stop_ids, self.stop_strings, self.show = decode, set(stop_ids), stop_strings, show
        self.ids: list[int] = []
        self.emitted = ""
        self.ended = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        if token in self.stop_ids:
            self.ended = True
            return ""
        if not (self.show or self.stop_strings):
            return ""
        text = self.decode(self.ids)
        if find_stop(text, self.stop_strings) is not None:
            self.ended = True
            return ""
        if not self.show:
            return ""
        visible = text[:len(text) - held_back(text, self.stop_strings)]
        if len(visible) > len(self.emitted) and visible.startswith(self.emitted):
            piece, self.emitted = visible[len(self.emitted):], visible
            return piece
        return ""

    def rest(self, final_text: str) -> str:
        """What the pieces shown so far still lack of the final answer (held-back text, a last piece)."""
        if not self.show or not final_text.startswith(self.emitted) or len(final_text) <= len(self.emitted):
            return ""
        piece, self.emitted = final_text[len(self.emitted):], final_text
        return piece
