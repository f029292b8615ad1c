"""The data manifest: exactly what a run sees, as one hash, and what differs between two datasets.

A manifest is computed from the opened record source (`sources.open_source`, the very object training reads), so
mixture draws come from the same code and seed as the run:

* sources: each source's name, sha256 (of the file, or of the files of a folder), record count and malformed
  records left out while reading;
* entries: for every mixture entry (or each file of a plain data spec: one entry `all`), its strategy (`random:N`,
  `first:N`, `end:N`, `random:P%`, `all`), the exact record ids drawn, in order, and the image folder it reads;
* image folders: file count, total size and a hash over the sorted (relative path, size) pairs; with `deep`, also a
  hash over the file contents.

`Manifest.hash` covers what the run sees (source names, contents and counts, drawn ids, image folder listings), not
where the files lie or the seed (its effect is in the draws), and not the deep content hash (so a deep manifest and
a training run's manifest of the same data agree). `diff(a, b)` names each difference in one line.

The cheap form (`describe(..., cheap=True)`: sizes and mtimes instead of sha256, drawn positions instead of ids)
costs one directory walk; `Manifest.cheap_key` keys the caches (record indices excepted: they key on the file only),
and the full manifest of the same inputs is cached under `<cache>/manifests/` (`cached_manifest`).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mlcd_vl.data import cache
from mlcd_vl.data.sources import ConcatRecords, HFRecords, JsonRecords, RecordSource, SubsetRecords, open_source
from mlcd_vl.errors import UsageError

VERSION = 1


class ManifestError(UsageError, ValueError):
    """A manifest file that cannot be read: missing, not JSON, another version, or edited by hand."""


@dataclass
class SourceInfo:
    name: str  # file (or folder) name: the identity; `path` is only where it was read on this machine
    path: str
    size: int
    mtime_ns: int
    records: int
    malformed: int = 0  # records left out while reading the file (malformed JSONL lines)
    sha256: str | None = None  # None in the cheap form


@dataclass
class EntryInfo:
    source: int  # index into `sources`
    strategy: str
    count: int
    positions_sha256: str  # the drawn positions in the source
    image_folder: int | None = None  # index into `image_folders`
    ids: list[str] | None = None  # the drawn records' ids, in order; None in the cheap form
    ids_sha256: str | None = None


@dataclass
class ImageFolderInfo:
    path: str
    files: int
    bytes: int
    listing_sha256: str  # over the sorted "relative/path<TAB>size" lines
    content_sha256: str | None = None  # with `deep`: over the sorted "relative/path<TAB>sha256" lines


@dataclass
class Manifest:
    data: str
    image_folder: str | None
    seed: int
    sources: list[SourceInfo] = field(default_factory=list)
    entries: list[EntryInfo] = field(default_factory=list)
    image_folders: list[ImageFolderInfo] = field(default_factory=list)
    deep: bool = False
    cheap: bool = False
    version: int = VERSION

    @property
    def records(self) -> int:
        return sum(entry.count for entry in self.entries)

    def identity(self) -> dict:
        """What the hash covers (see the module docstring)."""
        if self.cheap:
            raise ValueError("a cheap manifest has no hash; build the full one")
        return {"version": self.version,
                "sources": [[s.name, s.sha256, s.records, s.malformed] for s in self.sources],
                "entries": [[e.source, e.strategy, e.count, e.ids_sha256, e.image_folder] for e in self.entries],
                "image_folders": [[f.files, f.bytes, f.listing_sha256] for f in self.image_folders]}

    @property
    def hash(self) -> str:
        return cache.digest(self.identity())

    @property
    def cheap_key(self) -> str:
        """What the caches key on: paths, sizes, mtimes and counts of the sources, drawn positions, folder listings."""
        return cache.digest({"version": self.version,
                             "sources": [[s.path, s.size, s.mtime_ns, s.records, s.malformed] for s in self.sources],
                             "entries": [[e.source, e.strategy, e.count, e.positions_sha256, e.image_folder]
                                         for e in self.entries],
                             "image_folders": [[f.path, f.files, f.bytes, f.listing_sha256]
                                               for f in self.image_folders]})

    def to_dict(self) -> dict:
        data = asdict(self)
        if not self.cheap:
            data["hash"] = self.hash
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if data.get("version") != VERSION:
            raise ManifestError(f"data manifest version {data.get('version')!r} is not {VERSION}")
        manifest = cls(data["data"], data.get("image_folder"), int(data["seed"]),
                       [SourceInfo(**s) for s in data["sources"]], [EntryInfo(**e) for e in data["entries"]],
                       [ImageFolderInfo(**f) for f in data["image_folders"]], bool(data.get("deep")),
                       bool(data.get("cheap")))
        edited = "hash" in data and data["hash"] != manifest.hash
        edited |= any(e.ids is not None and e.ids_sha256 != cache.digest(e.ids) for e in manifest.entries)
        if edited:
            raise ManifestError("data manifest was edited: its recorded hashes do not match its content")
        return manifest

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(path.name + ".partial")
        scratch.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        os.replace(scratch, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ManifestError(f"{path}: not a data manifest ({error})") from None

    def describe(self) -> str:
        """A few lines for the console."""
        lines = [f"data manifest {self.hash[:16] if not self.cheap else '(cheap)'}: {self.records} records from "
                 f"{len(self.sources)} source(s), {len(self.entries)} entr{'y' if len(self.entries) == 1 else 'ies'}"
                 f", seed {self.seed}"]
        for entry in self.entries:
            source = self.sources[entry.source]
            lines.append(f"  {source.name} ({source.records} records) {entry.strategy}: {entry.count} drawn")
        for folder in self.image_folders:
            deep = f", contents {folder.content_sha256[:16]}" if folder.content_sha256 else ""
            lines.append(f"  images {folder.path}: {folder.files} files, {folder.bytes} bytes{deep}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


def _leaves(source: RecordSource) -> list[tuple[RecordSource, np.ndarray | None, str, str | None]]:
    """(base source, drawn positions or None for all, strategy, image folder) for each entry, in reading order."""
    if isinstance(source, ConcatRecords):
        return [leaf for part in source.parts for leaf in _leaves(part)]
    if isinstance(source, SubsetRecords):
        return [(source.source, source.indices, source.strategy or "subset", source.image_folder)]
    return [(source, None, "all", source.image_folder)]


def _files_of(source: RecordSource) -> list[str]:
    return list(getattr(source, "paths", []) or [])


def _walk(root: str) -> list[tuple[str, int]]:
    """(relative path with '/', size) of every file under `root`, sorted."""
    found = []
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=True):
                    found.append((os.path.relpath(entry.path, root).replace(os.sep, "/"),
                                  entry.stat(follow_symlinks=True).st_size))
    found.sort()
    return found


def _sha256_file(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _lines_sha256(pairs) -> str:
    digest = hashlib.sha256()
    for name, value in pairs:
        digest.update(f"{name}\t{value}\n".encode())
    return digest.hexdigest()


def _stat_source(source: RecordSource) -> tuple[str, int, int]:
    """(path, total size, newest mtime) of a source's files (a folder counts every file under it)."""
    files = _files_of(source)
    if not files:
        return getattr(source.dataset, "_fingerprint", source.name) if isinstance(source, HFRecords) else "", 0, 0
    size = mtime = 0
    for path in files:
        for name in ([os.path.join(path, rel) for rel, _ in _walk(path)] if os.path.isdir(path) else [path]):
            stat = os.stat(name)
            size, mtime = size + stat.st_size, max(mtime, stat.st_mtime_ns)
    return os.pathsep.join(os.path.realpath(p) for p in files), size, mtime


def _sha256_source(source: RecordSource) -> str:
    """The file's sha256; for several files or a folder, a hash over the sorted (relative path, sha256) lines."""
    files = _files_of(source)
    if not files:  # an in-memory datasets.Dataset: its own fingerprint is what identifies it
        return str(getattr(getattr(source, "dataset", None), "_fingerprint", ""))
    if len(files) == 1 and os.path.isfile(files[0]):
        return _sha256_file(files[0])
    pairs = []
    for path in files:
        if os.path.isdir(path):
            pairs += [(f"{Path(path).name}/{rel}", _sha256_file(os.path.join(path, rel))) for rel, _ in _walk(path)]
        else:
            pairs.append((Path(path).name, _sha256_file(path)))
    return _lines_sha256(sorted(pairs))


def _record_ids(source: RecordSource) -> list[str]:
    """Every record's id as the dataset names it (`samples.record_id_of`): its `id`, else `<name>#<position>`."""
    ids = None
    if isinstance(source, JsonRecords):
        ids = source.index.load_ids()
    elif isinstance(source, HFRecords) and "id" in source.dataset.column_names:
        table = source.dataset.select_columns(["id"]).with_format("arrow")[:]
        ids = [None if value is None else str(value) for value in table.column("id").to_pylist()]
    if ids is None:
        from mlcd_vl.data.samples import record_id_of

        ids = [record_id_of(source[i]) for i in range(len(source))]
    return [value if value is not None else f"{source.name}#{i}" for i, value in enumerate(ids)]


def _fingerprint_folder(path: str, deep: bool, threads: int = 8) -> ImageFolderInfo:
    listing = _walk(path)
    content = None
    if deep:
        with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL while hashing
            hashes = list(pool.map(lambda rel: _sha256_file(os.path.join(path, rel)), [rel for rel, _ in listing]))
        content = _lines_sha256(zip([rel for rel, _ in listing], hashes))
    return ImageFolderInfo(path, len(listing), sum(size for _, size in listing), _lines_sha256(listing), content)


def describe(records: RecordSource, data: str, image_folder: str | None, seed: int, *, deep: bool = False,
             cheap: bool = False) -> Manifest:
    """The manifest of an opened record source (`open_source(data, image_folder, seed=seed, ...)`)."""
    manifest = Manifest(data, image_folder, seed, deep=deep and not cheap, cheap=cheap)
    bases: dict[object, int] = {}  # one source per file, however many entries read it
    folders: dict[str, int] = {}
    ids_of: dict[object, list[str]] = {}
    for base, positions, strategy, folder in _leaves(records):
        key = tuple(os.path.realpath(p) for p in _files_of(base)) or id(base)
        if key not in bases:
            bases[key] = len(manifest.sources)
            path, size, mtime = _stat_source(base)
            name = Path(_files_of(base)[0]).name if len(_files_of(base)) == 1 else base.name
            manifest.sources.append(SourceInfo(name, path, size, mtime, len(base), len(base.load_problems),
                                               None if cheap else _sha256_source(base)))
        folder_index = None
        if folder and os.path.isdir(folder):
            real = os.path.realpath(folder)
            if real not in folders:
                folders[real] = len(manifest.image_folders)
                manifest.image_folders.append(_fingerprint_folder(real, manifest.deep))
            folder_index = folders[real]
        drawn = np.arange(len(base), dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
        entry = EntryInfo(bases[key], strategy, len(drawn), hashlib.sha256(drawn.tobytes()).hexdigest(),
                          folder_index)
        if not cheap:
            if key not in ids_of:
                ids_of[key] = _record_ids(base)
            all_ids = ids_of[key]
            entry.ids = [all_ids[i] for i in drawn]
            entry.ids_sha256 = cache.digest(entry.ids)
        manifest.entries.append(entry)
    return manifest


def build_manifest(data: str, image_folder: str | None = None, *, seed: int = 0, deep: bool = False,
                   preset_dir: str | None = None, cache_dir: str | os.PathLike | None = None) -> Manifest:
    """The manifest of a data spec, opened with the code and seed training uses (`open_source`)."""
    records = open_source(data, image_folder, seed=seed, preset_dir=preset_dir, cache_dir=cache_dir)
    return cached_manifest(records, data, image_folder, seed, deep=deep, cache_dir=cache_dir)


def cached_manifest(records: RecordSource, data: str, image_folder: str | None, seed: int, *, deep: bool = False,
                    cache_dir: str | os.PathLike | None = None, cheap: Manifest | None = None) -> Manifest:
    """The full manifest, from `<cache_dir>/manifests/` when the cheap form (sizes, mtimes, draws) is unchanged."""
    if cache_dir is None or not cache.writable(Path(cache_dir) / "manifests"):
        return describe(records, data, image_folder, seed, deep=deep)
    cheap = cheap or describe(records, data, image_folder, seed, cheap=True)
    entry = Path(cache_dir) / "manifests" / cache.digest({"cheap": cheap.cheap_key, "deep": deep, "data": data,
                                                          "image_folder": image_folder, "seed": seed})

    def build(folder: Path) -> None:
        describe(records, data, image_folder, seed, deep=deep).save(folder / "manifest.json")

    cache.build_once(entry, build)
    return Manifest.load(entry / "manifest.json")


# ----------------------------------------------------------------------------------------------------------------
# Comparing
# ----------------------------------------------------------------------------------------------------------------


def _short(value: str | None) -> str:
    return (value or "-")[:12]


def _ids_difference(old: list[str], new: list[str]) -> str:
    changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    parts = []
    if len(old) != len(new):
        parts.append(f"{len(old)} -> {len(new)} records")
    if changed:
        first = changed[0]
        parts.append(f"{len(changed)} of {min(len(old), len(new))} ids differ (first at position {first}: "
                     f"{old[first]!r} -> {new[first]!r})")
    return "; ".join(parts) or "same ids"


def diff(expected: Manifest, found: Manifest) -> list[str]:
    """One line per difference between two full manifests (empty: the same data)."""
    lines = []
    if len(expected.sources) != len(found.sources):
        lines.append(f"sources: {len(expected.sources)} ({', '.join(s.name for s in expected.sources)}) -> "
                     f"{len(found.sources)} ({', '.join(s.name for s in found.sources)})")
    for number, (a, b) in enumerate(zip(expected.sources, found.sources)):
        where = f"source {number} ({a.name})"
        for label, old, new in (("name", a.name, b.name), ("record count", a.records, b.records),
                                ("malformed records", a.malformed, b.malformed)):
            if old != new:
                lines.append(f"{where}: {label} {old} -> {new}")
        if a.sha256 != b.sha256:
            lines.append(f"{where}: file changed (sha256 {_short(a.sha256)} -> {_short(b.sha256)})")
    if len(expected.entries) != len(found.entries):
        lines.append(f"mixture entries: {len(expected.entries)} -> {len(found.entries)}")
    for number, (a, b) in enumerate(zip(expected.entries, found.entries)):
        name = expected.sources[a.source].name if a.source < len(expected.sources) else "?"
        where = f"mixture entry {number} ({name}, {a.strategy})"
        for label, old, new in (("strategy", a.strategy, b.strategy), ("image folder", a.image_folder,
                                                                        b.image_folder)):
            if old != new:
                lines.append(f"{where}: {label} {old} -> {new}")
        if a.ids_sha256 != b.ids_sha256:
            detail = (_ids_difference(a.ids, b.ids) if a.ids is not None and b.ids is not None
                      else f"{a.count} -> {b.count} records")
            seed = f" (seed {expected.seed} -> {found.seed})" if expected.seed != found.seed else ""
            lines.append(f"{where}: mixture draw changed: {detail}{seed}")
    if len(expected.image_folders) != len(found.image_folders):
        lines.append(f"image folders: {len(expected.image_folders)} -> {len(found.image_folders)}")
    for number, (a, b) in enumerate(zip(expected.image_folders, found.image_folders)):
        where = f"image folder {number} ({Path(a.path).name} -> {b.path})"
        if (a.files, a.bytes, a.listing_sha256) != (b.files, b.bytes, b.listing_sha256):
            lines.append(f"{where}: image folder changed: {a.files} -> {b.files} files, {a.bytes} -> {b.bytes} "
                         f"bytes, listing {_short(a.listing_sha256)} -> {_short(b.listing_sha256)}")
        elif a.content_sha256 and b.content_sha256 and a.content_sha256 != b.content_sha256:
            lines.append(f"{where}: image contents changed (same names and sizes; contents "
                         f"{_short(a.content_sha256)} -> {_short(b.content_sha256)})")
    return lines


def verify(expected: Manifest, data: str | None = None, image_folder: str | None = None, *,
           preset_dir: str | None = None, cache_dir: str | os.PathLike | None = None) -> tuple[Manifest, list[str]]:
    """The local data's manifest (with the expected one's seed and depth) and its differences from `expected`."""
    found = build_manifest(data or expected.data, image_folder if image_folder is not None else expected.image_folder,
                           seed=expected.seed, deep=expected.deep, preset_dir=preset_dir, cache_dir=cache_dir)
    return found, diff(expected, found)
