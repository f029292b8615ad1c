"""`mlcd-vl build`: compose a fresh VLM from an LLM and a vision tower and save it as an HF-native folder.

Example: `mlcd-vl build --llm qwen2.5-7b-instruct --tower mlcd-bigG-448 OUT_DIR`; `mlcd-vl build --tiny OUT_DIR` uses
a tiny random LLM and tower written locally (CPU tests, demos). `--llm` and `--tower` take a preset name (see
`mlcd_vl.presets`), a hub id or a local folder; an OpenCLIP tower (`--tower dfn5b-vitH-378`, or a folder with
`open_clip_config.json`) is converted once to a cached CLIPVisionModel (pickle-only weights need `--allow-pickle`).
The projector and `image_newline` are new (upstream's init); everything else keeps the pretrained weights. The
pinpoint grid, feature layer, CLS handling and image settings default to the tower preset's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mlcd_vl.errors import UsageError


class BuildError(UsageError, ValueError):
    """A build request that cannot work; the message names the offending value."""


def check_source(value: str, kind: str) -> None:
    """A preset name, an existing folder or something shaped like a hub id (`owner/name`); else a clear error."""
    from mlcd_vl import presets
    from mlcd_vl.model.sources import model_source

    registry = presets.TOWERS if kind == "tower" else presets.LLMS
    lookup = presets.tower_preset if kind == "tower" else presets.llm_preset
    if lookup(value) is not None:
        return
    path = Path(value).expanduser()
    if path.exists():
        open_clip = kind == "tower" and (path / "open_clip_config.json").is_file()
        if not (path / "config.json").is_file() and not open_clip:
            raise BuildError(f"--{kind} {value!r}: folder has no config.json"
                             + (" or open_clip_config.json" if kind == "tower" else ""))
        return
    if "/" not in value and not value.startswith(("~", ".")):
        raise BuildError(f"--{kind} {value!r}: not a known preset, a folder or a hub id (owner/name); "
                         f"presets: {', '.join(sorted(registry))}")
    model_source(value, f"--{kind}")  # a missing path, or a hub id not in the cache while offline: one line


def _check_reachable(value: str, kind: str) -> None:
    """Read the config of a hub id (or cache) now, so a failure names the value instead of a generic hub error."""
    from transformers import AutoConfig

    from mlcd_vl import presets

    resolved = presets.resolve_tower(value) if kind == "tower" else presets.resolve_llm(value)
    if Path(resolved).expanduser().exists():
        return
    preset = presets.tower_preset(value) if kind == "tower" else None
    if preset is not None and preset.source_format == "open_clip":
        return  # no transformers config to read: the conversion fetches open_clip_config.json and names failures
    try:
        AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BuildError(f"--{kind} {value!r}: cannot load {resolved!r} ({first_line})") from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write the model to")
    parser.add_argument("--llm", default=None, help="LLM preset, hub id or folder (default qwen2.5-7b-instruct)")
    parser.add_argument("--tower", default=None, help="vision tower preset, hub id or folder (default mlcd-bigG-448)")
    parser.add_argument("--image-mode", default="anyres", help="square, pad, anyres or anyres_max_N")
    parser.add_argument("--merge", default="spatial_unpad", choices=("flat", "spatial_unpad"),
                        help="how crop features are merged (flat for square/pad)")
    parser.add_argument("--pinpoints", default=None,
                        help="anyres grid as (width, height) pairs, e.g. '[(448,896),(896,448)]' or "
                             "'(1x1),...,(3x3)'; default: the tower preset's grid")
    parser.add_argument("--template", default="qwen_1_5", help="conversation template stored with the model")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the new projector and image_newline")
    parser.add_argument("--tiny", action="store_true",
                        help="use the tiny random LLM and tower (written locally) instead of --llm/--tower")
    parser.add_argument("--tiny-tower", default="mlcd", choices=("mlcd", "clip", "siglip"),
                        help="tower format of the tiny preset")
    parser.add_argument("--force", action="store_true", help="write into OUT_DIR even if it holds a model")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="let an OpenCLIP tower with only pickle weights (e.g. DFN5B) be converted once "
                             "(weights_only loading) into a cached safetensors CLIPVisionModel")


def build(args: argparse.Namespace) -> Path:
    """Compose and save; raises BuildError (or the loader's error) with the offending value named."""
    from mlcd_vl import presets
    from mlcd_vl.model.templates import TEMPLATES
    from mlcd_vl.model import anyres
    from mlcd_vl.model.build import VLMSpec, build_vlm, model_type_for
    from mlcd_vl.model.checkpoint import save_vlm

    out_dir = Path(args.out_dir).expanduser()
    if (out_dir / "config.json").exists() and not args.force:
        raise BuildError(f"{out_dir} already holds a model (config.json); pass --force to overwrite")
    if args.template not in TEMPLATES:
        raise BuildError(f"--template {args.template!r}: unknown; known: {', '.join(sorted(TEMPLATES))}")
    try:
        model_type_for(args.image_mode, args.merge)
    except ValueError as error:
        raise BuildError(f"--image-mode {args.image_mode!r} --merge {args.merge!r}: {error}") from None
    try:
        pinpoints = anyres.parse_pinpoints(args.pinpoints, 1) if args.pinpoints and "x" not in args.pinpoints \
            else args.pinpoints
    except (ValueError, SyntaxError) as error:
        raise BuildError(f"--pinpoints {args.pinpoints!r}: {error}") from None

    with tempfile.TemporaryDirectory(prefix="mlcd-vl-tiny-") as scratch:
        if args.tiny:
            from mlcd_vl.model import tiny

            if args.llm or args.tower:
                print("note: --tiny ignores --llm and --tower", file=sys.stderr)
            paths = tiny.write_tiny_assets(scratch, tower_kind=args.tiny_tower)
            llm, tower = str(paths["llm"]), str(paths["tower"])
            if pinpoints is None and anyres.is_anyres(args.image_mode):
                pinpoints = presets.upstream_grid(tiny.TinyShapes().image_size)
        else:
            llm, tower = args.llm or presets.DEFAULT_LLM, args.tower or presets.DEFAULT_TOWER
            check_source(llm, "llm")
            check_source(tower, "tower")
            if pinpoints is None and anyres.is_anyres(args.image_mode) and presets.tower_preset(tower) is None:
                raise BuildError(f"--tower {tower!r} is not a preset, so it has no default grid; pass --pinpoints")
            for value, kind in ((llm, "llm"), (tower, "tower")):
                _check_reachable(value, kind)
        spec = VLMSpec(llm=llm, tower=tower, image_mode=args.image_mode, merge_type=args.merge,
                       pinpoints=pinpoints, template=args.template, dtype=args.dtype, seed=args.seed,
                       allow_pickle=args.allow_pickle)
        model, tokenizer, settings = build_vlm(spec)
        if args.tiny:
            settings.llm, settings.tower = "tiny", f"tiny-{args.tiny_tower}"
        save_vlm(model, tokenizer, settings, out_dir)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"built {type(model).__name__} ({parameters / 1e6:.2f}M parameters; {settings.image_mode}/"
          f"{settings.merge_type}, {len(settings.pinpoints)} pinpoints, template {settings.template}) -> {out_dir}")
    return out_dir


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from mlcd_vl.console import quiet_deepspeed_cpu_notice

    hf_logging.disable_progress_bar()
    quiet_deepspeed_cpu_notice()
    try:
        build(args)
    except UsageError:
        raise
    except KeyError as error:
        raise UsageError(error.args[0] if error.args else str(error)) from error
    except (OSError, ValueError) as error:  # the loaders' own errors
        raise UsageError(f"cannot build the model: {error}") from error
    return 0
