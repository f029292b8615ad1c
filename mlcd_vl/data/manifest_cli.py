"""`mlcd-vl data manifest DATA` writes the data manifest; `mlcd-vl data check --manifest M [DATA]` verifies it.

    mlcd-vl data manifest data/mix.yaml --image-folder data/images --seed 42 --out mix.manifest.json
    mlcd-vl data check --manifest mix.manifest.json --image-folder /other/machine/images   # exit 1 on difference

The manifest is computed with the code training uses (`data.manifest`), so `--seed` must be the recipe's `seed`
(mixture `random` entries are drawn with it; the training default is 42). Verification rebuilds the local data's
manifest with the recorded seed (and `--deep` when the manifest was deep) and prints every difference.
"""

from __future__ import annotations

import argparse

TRAINING_SEED = 42  # TrainConfig.seed's default: what a recipe without `seed:` draws with


def add_parser(commands) -> None:
    parser = commands.add_parser("manifest", help="write the manifest of what a run on DATA will see")
    parser.add_argument("data", help="JSON/JSONL file, parquet, saved HF dataset, brace list, YAML mixture or preset")
    parser.add_argument("--image-folder", help="folder that relative image paths are resolved against")
    parser.add_argument("--seed", type=int, default=TRAINING_SEED,
                        help=f"the recipe's seed (draws of `random` mixture entries; default {TRAINING_SEED}, "
                             "the training default)")
    parser.add_argument("--deep", action="store_true", help="also hash the contents of every image file")
    parser.add_argument("--out", default="data_manifest.json", help="where the manifest is written")
    add_common(parser)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset-dir", help="local folder holding a preset dataset")
    parser.add_argument("--cache-dir", help="data cache folder (default: $MLCD_VL_CACHE_DIR or ~/.cache/mlcd_vl; "
                                            "'off' for none)")


def write(args) -> int:
    from mlcd_vl.data.cache import resolve_cache_dir
    from mlcd_vl.data.manifest import build_manifest

    manifest = build_manifest(args.data, args.image_folder, seed=args.seed, deep=args.deep,
                              preset_dir=args.preset_dir, cache_dir=resolve_cache_dir(args.cache_dir))
    path = manifest.save(args.out)
    print(manifest.describe())
    print(f"hash {manifest.hash}\nwrote {path}")
    return 0


def verify(args) -> int:
    """Exit 0 when the local data matches the manifest, 1 with one line per difference otherwise."""
    from mlcd_vl.data.cache import resolve_cache_dir
    from mlcd_vl.data.manifest import Manifest
    from mlcd_vl.data.manifest import verify as verify_manifest

    expected = Manifest.load(args.manifest)
    found, differences = verify_manifest(expected, args.data, args.image_folder, preset_dir=args.preset_dir,
                                         cache_dir=resolve_cache_dir(args.cache_dir))
    if not differences:
        print(f"data matches manifest {args.manifest}: {expected.hash}")
        return 0
    print(f"data differs from manifest {args.manifest} ({expected.hash[:16]} -> {found.hash[:16]}):")
    for line in differences:
        print(f"  {line}")
    return 1
