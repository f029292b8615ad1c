"""The length table of the scan, cached on disk and reused by every rank, restart and run on the same inputs.

The key (`length_key`) covers everything a record's measured length depends on:

* the data: the data manifest's cheap form (source paths, sizes, mtimes and record counts, the mixture draws, the
  image folders' listings of names and sizes; `manifest.Manifest.cheap_key`);
* the tokenizer: a hash of its full serialisation (vocabulary, merges, added tokens, normaliser);
* the model's image settings (mode, merge, pinpoints, crop and patch size) and the template;
* the data settings that change lengths or skips (max_length, label mode, multi-image mode, pixel limit, EXIF
  handling, image-to-front), and whether images were decoded or only their headers read;
* the code that measures (`data/samples.py`, `data/dataset.py` (the scan, which also skips repeated records),
  `model/templates.py`, `model/anyres.py`, `model/pixels.py`, `vocab.py`): editing it invalidates the cache.

A changed input gives another key, hence a fresh scan; stale entries are never read. The table (lengths,
has_image, supervised tokens and the skipped records with their reasons) lives in `<cache>/lengths/<key>/lengths.npz`;
`FORMAT` changes with what the table holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from mlcd_vl.data import cache
from mlcd_vl.data.dataset import LENGTHS_FILE, LengthTable, SupervisedDataset, scan
from mlcd_vl.data.problems import ProblemLog

FORMAT = 2  # 2: the table records supervised tokens per record
_PACKAGE = Path(__file__).resolve().parents[1]
MEASURING_CODE = ("data/samples.py", "data/dataset.py", "model/templates.py", "model/anyres.py", "model/pixels.py",
                  "vocab.py")
# Fields that do not change a measured length (or are covered by the data key).
_DATA_FIELDS_IGNORED = {"train", "image_folder", "preset_dir", "cache_dir", "strict",  # data key; no effect
                        "packing", "token_budget", "group_by_modality", "drop_last", "num_workers",  # batching
                        "order_file"}
_SETTINGS_IGNORED = {"llm", "tower", "image_mean", "image_std", "data_manifest"}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (fast tokenizers), else of its class, vocabulary and specials."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(cache.digest(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(cache.digest(tokenizer.special_tokens_map).encode())
    return digest.hexdigest()


def code_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in MEASURING_CODE:
        digest.update(name.encode() + b"\0" + (_PACKAGE / name).read_bytes())
    return digest.hexdigest()


def length_key(data_key: str, tokenizer, dataset: SupervisedDataset, *, decode_images: bool = False) -> str:
    config = dataclasses.asdict(dataset.config)
    settings = dataset.settings.to_dict()
    return cache.digest({
        "format": FORMAT, "data": data_key, "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": dataset.config.template or dataset.settings.template,
        "settings": {k: v for k, v in settings.items() if k not in _SETTINGS_IGNORED},
        "config": {k: v for k, v in config.items() if k not in _DATA_FIELDS_IGNORED},
        "decode_images": decode_images, "code": code_fingerprint(),
    })


def cached_scan(dataset: SupervisedDataset, data_key: str, cache_dir: str | os.PathLike | None, *, workers: int = 0,
                progress: bool = False, log: ProblemLog | None = None,
                decode_images: bool = False) -> tuple[LengthTable, bool]:
    """(length table, whether it came from the cache): `scan` once per key; skipped records go to `log` either way."""
    if cache_dir is None or not cache.writable(Path(cache_dir) / "lengths"):
        return scan(dataset, workers=workers, decode_images=decode_images, progress=progress, log=log), False
    entry = Path(cache_dir) / "lengths" / length_key(data_key, dataset.tokenizer, dataset,
                                                     decode_images=decode_images)

    def build(folder: Path) -> None:
        scan(dataset, workers=workers, decode_images=decode_images, progress=progress).save(
            str(folder / LENGTHS_FILE))

    built = cache.build_once(entry, build)
    table = LengthTable.load(str(entry / LENGTHS_FILE))
    if len(table.lengths) != len(dataset):
        raise RuntimeError(f"{entry}: cached length table has {len(table.lengths)} records, the data {len(dataset)}")
    if log is not None:
        log.extend(table.skipped)
    return table, not built
