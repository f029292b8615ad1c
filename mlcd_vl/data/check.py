"""`mlcd-vl data check DATA`: scan a training dataset the way training will read it and report every problem.

Each record goes through the same label builder as training (template, tokenization, exact visual-token counts,
truncation rules), with every image fully decoded (`--headers-only` reads just the headers), in `--workers`
processes with a progress bar. The report gives counts per problem with example record ids, token-length and
visual-token statistics, a histogram of sequence lengths (PNG) and everything as JSON. The exit code is 1 when any
record would be skipped, so the command can gate a training launch.

`data manifest DATA` writes the data manifest (what a run sees, pinned by hash) and `data check --manifest M`
verifies that local data is the dataset it describes (`manifest_cli`).

Training skips exactly the records listed here, for the same reasons (`data.strict: true` makes each an error):
missing / empty / unreadable / oversized images, a wrong number of `<image>` placeholders, malformed records and
conversations, an empty or whitespace-only answer, a conversation that ends on a question, a record repeated with
the same id and content (the first copy is kept), truncation that would cut an image or leave nothing to learn.
Ids shared by records whose contents differ are reported but kept (they are different samples).

It also writes the length table (`lengths.npz` in `--out`, or `--lengths-out`): the same file training writes into
its output folder, so `mlcd-vl plan RECIPE --lengths` can plan the real micro-batches before any training run.
It matches training's table when the options match the recipe (model, `--max-length`, `--label-mode`, and `--seed`
for random mixture subsets); records whose images fail to decode count as skipped here, while training's header
scan would still read them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from mlcd_vl.data import manifest_cli


def configure_parser(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION")
    check = commands.add_parser(
        "check", help="scan a dataset and report every problem by record; with --manifest, verify it is the "
                      "dataset the manifest describes",
        description="Read every record the way training will (template, tokenizer, image sizes and visual-token "
                    "counts, truncation) and report each record training would skip, by id and reason, with "
                    "token-length statistics and a histogram. Exit status 1 when any record would be skipped. "
                    "With --manifest, also verify the data is the dataset a data manifest describes.",
        epilog="example:\n  mlcd-vl data check runs/demo/data/chat.json --model runs/demo/stage2 \\\n"
               "      --image-folder runs/demo/data/images\n"
               "  mlcd-vl data check train.json --tiny --image-folder images/ --headers-only --workers 8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("data", nargs="?", help="JSON/JSONL file, parquet, saved HF dataset, YAML mixture or preset "
                                               "name (with --manifest: default the manifest's)")
    check.add_argument("--manifest", help="a data manifest (`data manifest`): verify the data against it, exit 1 and "
                                          "name each difference; without --model/--tiny nothing else is checked")
    model = check.add_mutually_exclusive_group()
    model.add_argument("--model", help="a saved mlcd-vl / LLaVA model folder (tokenizer and image settings)")
    model.add_argument("--tiny", action="store_true", help="use the tiny preset's tokenizer and image settings")
    check.add_argument("--tiny-dir", default=os.path.join(tempfile.gettempdir(), "mlcd_vl_tiny"),
                       help="where the tiny assets are written (reused when present)")
    check.add_argument("--image-folder", help="folder that relative image paths are resolved against")
    check.add_argument("--max-length", type=int, default=32768, help="tokens after <image> expansion")
    check.add_argument("--template", help="override the model's template (plain, qwen_1_5)")
    check.add_argument("--image-mode", help="override the model's image mode (square, pad, anyres, anyres_max_N)")
    check.add_argument("--label-mode", default="default", choices=("default", "upstream"),
                       help="which tokens are trained: default (assistant turns) or upstream (its masking quirk)")
    check.add_argument("--headers-only", action="store_true", help="read image headers instead of decoding images")
    check.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    check.add_argument("--seed", type=int, default=0, help="seed of random mixture subsets")
    check.add_argument("--out", default=os.path.join("runs", "data-check"),
                       help="folder for report.json, lengths.png and lengths.npz")
    check.add_argument("--lengths-out", metavar="NPZ",
                       help="where to write the length table for `mlcd-vl plan --lengths` (default: OUT/lengths.npz)")
    manifest_cli.add_common(check)
    manifest_cli.add_parser(commands)


def _model_inputs(args):
    """(tokenizer, VLMSettings) from a model folder or the tiny preset, with command-line overrides."""
    from dataclasses import replace

    from mlcd_vl.model import anyres
    from mlcd_vl.model.build import VLMSettings, load_tokenizer, prepare_tokenizer

    if args.model:
        from transformers import AutoTokenizer

        from mlcd_vl.model.checkpoint import read_settings

        settings = read_settings(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        from mlcd_vl.model.tiny import TinyShapes, write_tiny_assets
        from mlcd_vl.presets import upstream_grid

        paths, shapes = write_tiny_assets(args.tiny_dir), TinyShapes()
        size = shapes.image_size
        settings = VLMSettings(image_mode="anyres", merge_type="spatial_unpad", crop_size=size,
                               patch_size=shapes.patch_size, llm=str(paths["llm"]), tower=str(paths["tower"]),
                               pinpoints=upstream_grid(size))
        tokenizer = load_tokenizer(str(paths["llm"]))
    if args.image_mode:
        # the pairs transformers' classes represent: square/pad + flat, anyres(_max_N) + spatial_unpad
        merge = "spatial_unpad" if anyres.is_anyres(args.image_mode) else "flat"
        settings = replace(settings, image_mode=args.image_mode, merge_type=merge)
    if args.template:
        settings = replace(settings, template=args.template)
    return prepare_tokenizer(tokenizer, settings.template), settings


def _describe(values) -> dict:
    import numpy as np

    if len(values) == 0:
        return {"count": 0}
    array = np.asarray(values)
    quantiles = {f"p{q}": float(np.percentile(array, q)) for q in (50, 90, 99)}
    return {"count": int(array.size), "min": int(array.min()), "mean": round(float(array.mean()), 2),
            "max": int(array.max()), "total": int(array.sum()), **quantiles}


def _histogram(lengths, max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.hist(lengths, bins=min(60, max(5, len(set(lengths)))), color="#3b6ea5")
    if max_length <= 2 * max(lengths):  # a far-away limit line would squash the histogram into one bar
        axis.axvline(max_length, color="#c0392b", linestyle="--", label=f"max_length {max_length}")
    else:
        axis.plot([], [], " ", label=f"max_length {max_length} (off the chart)")
    axis.set_xlabel("tokens per sample (images expanded)")
    axis.set_ylabel("samples")
    axis.set_title(f"sequence lengths of {len(lengths)} usable samples")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def shared_ids(stats) -> dict[str, int]:
    """Ids carried by several usable records whose contents differ (kept: they are different samples)."""
    from collections import Counter

    counts = Counter(s.record_id for s in stats)
    return {record_id: count for record_id, count in counts.items() if count > 1}


def build_report(args, table, log, dataset) -> dict:
    stats = [s for s in table.stats if s is not None]
    visual_per_image = [count for s in stats for count in s.visual_tokens]
    shared = shared_ids(stats)
    return {
        "data": args.data, "model": args.model or "tiny", "template": dataset.builder.template.name,
        "image_mode": dataset.settings.image_mode, "max_length": args.max_length, "label_mode": args.label_mode,
        "records": len(dataset) + len(dataset.load_problems), "usable": len(stats), "skipped": log.to_dict(),
        "problems": [{"id": s.record_id, "problem": s.problem.value, "detail": s.detail} for s in table.skipped],
        "shared_ids": {"count": len(shared), "records": sum(shared.values()),
                       "examples": dict(list(shared.items())[:5])},
        "truncated": sum(s.truncated for s in stats),
        "modalities": {"image": sum(bool(s.visual_tokens) for s in stats),
                       "text": sum(not s.visual_tokens for s in stats)},
        "sequence_tokens": _describe([s.length for s in stats]),
        "text_tokens": _describe([s.text_tokens for s in stats]),
        "supervised_tokens": _describe([s.supervised_tokens for s in stats]),
        "visual_tokens_per_image": _describe(visual_per_image),
        "images_per_record": _describe([len(s.visual_tokens) for s in stats]),
    }


def run(args) -> int:
    command = getattr(args, "data_command", None)
    if command == "manifest":
        return manifest_cli.write(args)
    verified = manifest_cli.verify(args) if command == "check" and args.manifest else 0
    if command == "check" and args.manifest and not (args.model or args.tiny):
        return verified
    if command != "check" or not args.data or not (args.model or args.tiny):
        print("usage: mlcd-vl data check DATA (--model DIR | --tiny) [--manifest M] [options] | "
              "mlcd-vl data manifest DATA [options]; see `mlcd-vl data check -h`")
        return 2
    from mlcd_vl.model.sources import model_source

    if args.model:
        model_source(args.model, "--model")  # answered before torch and transformers load
    from transformers.utils import logging as hf_logging

    from mlcd_vl.console import quiet_deepspeed_cpu_notice
    from mlcd_vl.data.dataset import LENGTHS_FILE, SupervisedDataset, scan
    from mlcd_vl.data.problems import ProblemLog
    from mlcd_vl.data.config import DataConfig

    hf_logging.disable_progress_bar()  # writing the tiny assets is not news
    quiet_deepspeed_cpu_notice()
    tokenizer, settings = _model_inputs(args)
    config = DataConfig(train=args.data, image_folder=args.image_folder, max_length=args.max_length,
                        label_mode=args.label_mode, preset_dir=args.preset_dir, cache_dir=args.cache_dir)
    dataset = SupervisedDataset.from_config(config, tokenizer, settings, seed=args.seed)
    log = ProblemLog(log_first=0)
    table = scan(dataset, workers=args.workers, decode_images=not args.headers_only, keep_stats=True,
                 progress=True, log=log)
    report = build_report(args, table, log, dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [s.length for s in table.stats if s is not None]
    if lengths:
        _histogram(lengths, args.max_length, out / "lengths.png")
        report["histogram"] = str(out / "lengths.png")
    lengths_path = Path(args.lengths_out) if args.lengths_out else out / LENGTHS_FILE
    lengths_path.parent.mkdir(parents=True, exist_ok=True)
    table.save(str(lengths_path))
    report["length_table"] = str(lengths_path)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(console_summary(report, table.skipped, args.image_folder))
    print(f"report: {out / 'report.json'}")
    print(f"length table: {lengths_path} (for `mlcd-vl plan RECIPE --lengths {lengths_path}`)")
    return 1 if log.total or verified else 0


STATISTICS = (("sequence tokens", "sequence_tokens"), ("text tokens", "text_tokens"),
              ("supervised tokens", "supervised_tokens"), ("visual tokens per image", "visual_tokens_per_image"),
              ("images per record", "images_per_record"))
DETAILS_PER_PROBLEM = 3  # records shown with their detail on the console (report.json has every one)


def console_summary(report: dict, skipped, image_folder: str | None) -> str:
    """What the console shows: counts, each problem with the detail of its first few records, the statistics."""
    from mlcd_vl.console import text_table

    lines = [f"{report['records']} records, {report['usable']} usable, {report['truncated']} truncated"]
    counts = report["skipped"]["counts"]
    if not counts:
        lines.append("problems: none")
    for problem, count in counts.items():
        lines.append(f"{problem}: {count} record(s)")
        shown = [s for s in skipped if s.problem.value == problem][:DETAILS_PER_PROBLEM]
        lines += [f"  {s.record_id}: {s.detail}" for s in shown]
        if count > len(shown):
            lines.append(f"  ... and {count - len(shown)} more (report.json lists every one)")
    missing = counts.get("image_missing", 0)
    if missing and not image_folder and not report["modalities"]["image"]:
        lines.append("hint: every image is missing and no --image-folder was given; relative image paths are "
                     "read from the current folder (pass --image-folder DIR, or data.image_folder in a recipe)")
    shared = report["shared_ids"]
    if shared["count"]:
        examples = ", ".join(f"{k} (x{v})" for k, v in shared["examples"].items())
        lines.append(f"note: {shared['count']} id(s) are shared by {shared['records']} records with different "
                     f"contents, e.g. {examples}; all are kept (an order file cannot name them)")
    rows = []
    for label, key in STATISTICS:
        values = report[key]
        if values["count"]:
            rows.append([label] + [f"{values[k]:g}" for k in ("count", "min", "p50", "mean", "p90", "p99", "max")])
    if rows:
        lines += ["", text_table(["usable records", "count", "min", "p50", "mean", "p90", "p99", "max"], rows)]
    return "\n".join(lines)
