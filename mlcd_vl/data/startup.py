"""What a run needs from its data before the first step, paid once: the data manifest and the length table.

`prepare(dataset, ...)` computes the manifest's cheap form (one directory walk), reads the length table from the
cache or scans once (`lengths_cache`), and reads or builds the full manifest (`manifest.cached_manifest`), all under
the cache folder the dataset's config names (`data.cache`). The main process of a run calls it; a restart with the
same inputs reads everything back without scanning a record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mlcd_vl.data import cache, lengths_cache, manifest
from mlcd_vl.data.dataset import LengthTable, SupervisedDataset
from mlcd_vl.data.problems import ProblemLog


@dataclass
class DataStart:
    table: LengthTable
    manifest: manifest.Manifest
    scanned: bool  # False: the length table came from the cache
    seconds: dict[str, float] = field(default_factory=dict)  # where the start-up time went

    def describe(self) -> str:
        timing = ", ".join(f"{name} {value:.1f}s" for name, value in self.seconds.items())
        source = "scanned" if self.scanned else "read from the cache"
        return f"data manifest {self.manifest.hash[:16]}; length table {source} ({timing})"


def prepare(dataset: SupervisedDataset, seed: int, *, workers: int = 0, progress: bool = False,
            log: ProblemLog | None = None, decode_images: bool = False) -> DataStart:
    """`seed`: the one the dataset's mixture draws were made with (`SupervisedDataset.from_config`)."""
    config = dataset.config
    cache_dir = cache.resolve_cache_dir(config.cache_dir)
    seconds = {}
    start = time.perf_counter()
    cheap = manifest.describe(dataset.records, config.train, config.image_folder, seed, cheap=True)
    seconds["fingerprint"] = time.perf_counter() - start
    start = time.perf_counter()
    table, cached = lengths_cache.cached_scan(dataset, cheap.cheap_key, cache_dir, workers=workers,
                                              progress=progress, log=log, decode_images=decode_images)
    seconds["lengths"] = time.perf_counter() - start
    start = time.perf_counter()
    full = manifest.cached_manifest(dataset.records, config.train, config.image_folder, seed,
                                    cache_dir=cache_dir, cheap=cheap)
    seconds["manifest"] = time.perf_counter() - start
    return DataStart(table, full, not cached, seconds)
