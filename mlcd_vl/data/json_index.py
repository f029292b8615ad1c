"""Byte-offset index of a LLaVA JSON / JSONL file: records are parsed lazily from a memory-mapped file.

One streaming pass over the file (bounded memory, never the whole file as Python objects) finds where each record
starts and ends, checks that it parses, and notes its `id`:

* JSONL (a `.jsonl` file, or any file whose first non-blank character is not `[`): one record per line; a line that
  does not parse is left out and reported (`line N`, malformed JSON), exactly as the eager reader did;
* a JSON array (upstream's `llava_*.json`): elements are decoded one at a time (`json.JSONDecoder.raw_decode` over a
  sliding text window) and their byte ranges recorded; a malformed array is an error naming the byte offset.

The index (an int64 `[N, 2]` array of byte ranges, the load problems and the ids) is cached under
`<cache>/records/` keyed by the file's resolved path, size and mtime (`cache.build_once`), and memory-mapped when
read, so every rank and every restart shares one copy in the page cache. Record `i` is `json.loads` of its bytes:
the same value the eager reader gave.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlcd_vl.data import cache
from mlcd_vl.data.problems import Problem, SkippedRecord

FORMAT = 1  # bump when the index layout or the parsing rules change
WINDOW = 1 << 24  # characters decoded per read of a JSON array
_BLANK = re.compile(r"[ \t\n\r]*")  # JSON whitespace (what json.loads skips)


@dataclass
class RecordIndex:
    """Where each record of a file lies, and what the pass learnt about it."""

    ranges: np.ndarray  # int64 [N, 2]: byte start, byte end
    problems: list[SkippedRecord]
    ids: list[str | None] | None  # str(record["id"]) or None per record; None when not kept (read with `load_ids`)
    kind: str  # "jsonl" | "array"
    folder: Path | None = None  # the cache entry it was read from

    def load_ids(self) -> list[str | None] | None:
        """Each record's `id` as the indexing pass saw it (None where a record has none), or None if not kept."""
        if self.ids is None and self.folder is not None:
            return json.loads((self.folder / "ids.json").read_text())
        return self.ids


def _is_array(path: Path) -> bool:
    if path.suffix == ".jsonl":
        return False
    with open(path, "rb") as handle:
        while True:
            head = handle.read(1 << 16)
            if not head:
                return False
            text = head.decode("utf-8", errors="replace").lstrip()
            if text:
                return text.startswith("[")


def _id_of(record) -> str | None:
    return str(record["id"]) if isinstance(record, dict) and record.get("id") is not None else None


def _index_jsonl(path: Path, name: str) -> RecordIndex:
    starts, ends, ids, problems = [], [], [], []
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            start, offset = offset, offset + len(line)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                problems.append(SkippedRecord(f"{name}:line {number}", Problem.BAD_RECORD,
                                              f"not UTF-8 ({error.reason})"))
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                problems.append(SkippedRecord(f"{name}:line {number}", Problem.BAD_RECORD,
                                              f"malformed JSON ({error.msg})"))
                continue
            starts.append(start)
            ends.append(offset)
            ids.append(_id_of(record))
    ranges = np.stack([np.asarray(starts, np.int64), np.asarray(ends, np.int64)], axis=1).reshape(-1, 2)
    return RecordIndex(ranges, problems, ids, "jsonl")


class _Window:
    """A sliding window of decoded text over a UTF-8 file that knows the byte offset of each character it holds."""

    def __init__(self, handle):
        self.handle, self.decoder = handle, codecs.getincrementaldecoder("utf-8")()
        self.text, self.base_char, self.base_byte, self.eof = "", 0, 0, False

    def more(self) -> bool:
        if self.eof:
            return False
        chunk = self.handle.read(WINDOW)
        self.eof = not chunk
        self.text += self.decoder.decode(chunk, final=self.eof)
        return True

    def drop_before(self, char: int) -> None:
        """Forget the text before window position `char` (its bytes are counted into the base offset)."""
        if char > WINDOW:
            self.base_byte += len(self.text[:char].encode("utf-8"))
            self.base_char += char
            self.text = self.text[char:]

    def byte_at(self, char: int) -> int:
        return self.base_byte + len(self.text[:char].encode("utf-8"))

    def skip_blank(self, position: int) -> int:
        """The first position at or after `position` that is not JSON whitespace (reading on as needed)."""
        while True:
            found = _BLANK.match(self.text, position).end()
            if found < len(self.text) or not self.more():
                return found


def _index_array(path: Path, name: str) -> RecordIndex:
    decoder = json.JSONDecoder()
    starts, ends, ids = [], [], []
    with open(path, "rb") as handle:
        window = _Window(handle)

        def fail(position: int, what: str) -> ValueError:
            return ValueError(f"{path}: malformed JSON list at byte {window.byte_at(position)}: {what}")

        position = window.skip_blank(0)
        if window.text[position:position + 1] != "[":
            raise fail(position, "expected a JSON list of records")
        position, expect_element, first = position + 1, True, True
        byte_cursor, char_cursor = window.byte_at(position), position  # byte offset of window position char_cursor
        while True:
            position = window.skip_blank(position)
            if position >= len(window.text):
                raise fail(position, "the list is not closed")
            char = window.text[position]
            if char == "]" and (first or not expect_element):
                position += 1
                break
            if not expect_element:
                if char != ",":
                    raise fail(position, f"expected ',' or ']', found {char!r}")
                position, expect_element = position + 1, True
                continue
            while True:  # decode one element, reading on when the window ends inside it
                try:
                    record, end = decoder.raw_decode(window.text, position)
                    if end < len(window.text) or window.eof:
                        break
                except json.JSONDecodeError as error:
                    if window.eof:
                        raise fail(position, error.msg) from None
                if not window.more():
                    raise fail(position, "truncated")
            start_byte = byte_cursor + len(window.text[char_cursor:position].encode("utf-8"))
            end_byte = start_byte + len(window.text[position:end].encode("utf-8"))
            starts.append(start_byte)
            ends.append(end_byte)
            ids.append(_id_of(record))
            byte_cursor, char_cursor = end_byte, end
            position, expect_element, first = end, False, False
            if char_cursor > WINDOW:  # keep the window small: drop what was consumed
                window.drop_before(char_cursor)
                position -= char_cursor
                char_cursor = 0
        if window.skip_blank(position) < len(window.text):
            raise fail(window.skip_blank(position), "extra data after the list")
    ranges = np.stack([np.asarray(starts, np.int64), np.asarray(ends, np.int64)], axis=1).reshape(-1, 2)
    return RecordIndex(ranges, [], ids, "array")


def build_index(path: str | os.PathLike) -> RecordIndex:
    """Index `path` in one streaming pass (see the module docstring)."""
    path = Path(path)
    name = path.name
    return _index_array(path, name) if _is_array(path) else _index_jsonl(path, name)


def index_key(path: str | os.PathLike) -> str:
    """What the index depends on: the file's resolved path, size and modification time (and this module's rules)."""
    stat = os.stat(path)
    return cache.digest({"index": FORMAT, "path": os.path.realpath(path), "size": stat.st_size,
                         "mtime_ns": stat.st_mtime_ns})


def _save(index: RecordIndex, folder: Path) -> None:
    np.save(folder / "ranges.npy", index.ranges)
    (folder / "ids.json").write_text(json.dumps(index.ids, ensure_ascii=False))
    meta = {"format": FORMAT, "kind": index.kind, "records": len(index.ranges),
            "problems": [[p.record_id, p.problem.value, p.detail] for p in index.problems]}
    (folder / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))


def _load(folder: Path) -> RecordIndex:
    meta = json.loads((folder / "meta.json").read_text())
    problems = [SkippedRecord(rid, Problem(problem), detail) for rid, problem, detail in meta["problems"]]
    return RecordIndex(np.load(folder / "ranges.npy", mmap_mode="r"), problems, None, meta["kind"], folder)


def cached_index(path: str | os.PathLike, cache_dir: str | os.PathLike | None) -> RecordIndex:
    """The index of `path`, from `<cache_dir>/records/` (built there once) or built in memory without a cache."""
    if cache_dir is None or not cache.writable(Path(cache_dir) / "records"):
        index = build_index(path)
        index.ids = None  # not kept in memory: a manifest reads the ids from the records instead
        return index
    entry = Path(cache_dir) / "records" / index_key(path)
    cache.build_once(entry, lambda folder: _save(build_index(path), folder))
    return _load(entry)
