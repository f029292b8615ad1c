"""Convert upstream LLaVA-format checkpoints to HF-native folders and back.

    mlcd-vl convert SRC DST [--vision-tower PATH] [--base-llm PATH] [--allow-pickle] [--to hf|upstream]
                            [--projector-only] [--dtype auto|float32|bfloat16|float16]

SRC is a folder or a hub id (downloaded once into the Hugging Face cache; with HF_HUB_OFFLINE=1 read from it). The
direction comes from SRC/config.json (never from a path):

* upstream stage-2 checkpoint (`architectures: [LlavaQwenForCausalLM]`, model_type `qwen2` or `llava_qwen`)
  -> HF-native folder: anyres / anyres_max_N + spatial_unpad become LLaVA-NeXT / LLaVA-OneVision, square / pad + flat
  become LLaVA. Every vision weight comes from the checkpoint; the tower named in
  `mm_vision_tower` only supplies its config and image-processor settings.
* upstream stage-1 artifact (config.json with mm_* keys + `mm_projector.bin`) -> HF-native LLaVA folder, with the
  base LLM (`_name_or_path` or --base-llm) and the tower weights from the tower folder.
* HF-native folder (llava, llava_next, llava_onevision) -> upstream `LlavaQwenForCausalLM` checkpoint
  (config.json, model.safetensors, tokenizer, generation_config.json); with --projector-only, a stage-1 artifact
  (config.json + `mm_projector.bin`) for upstream's `--pretrain_mm_mlp_adapter`.

Weight names: `model.vision_tower.vision_tower.vision_model.X` <-> `model.vision_tower.X`,
`model.mm_projector.{0,2}.*` <-> `model.multi_modal_projector.linear_{1,2}.*`, `model.image_newline` and
`lm_head.weight` unchanged, any other `model.X` <-> `model.language_model.X`. Every source key must be used and
every model key filled with the right shape; otherwise the error names the key. Upstream pinpoints are
(width, height) and stay so in our settings; the transformers config gets (height, width) (compose_config swaps).
The LLaVA-only fields of the upstream config ride along in config.json under `mlcd_vl_upstream`, so a round trip
upstream -> HF-native -> upstream gives back the same config fields and bit-identical tensors.

Pickled `.bin` files run code when unpickled: they are read only with --allow-pickle (`allow_pickle=True`), and
then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The two directions live in convert_to_hf.py and convert_to_upstream.py; the names other modules and the tests
# import from here (the error type, format detection, pickle reading) are re-exported.
from mlcd_vl.model.convert_to_hf import (convert_stage1_to_hf, convert_upstream_to_hf, find_local, load_tower_info,
                                         load_upstream_weights, resolve_source)
from mlcd_vl.model.convert_to_upstream import convert_hf_to_upstream
from mlcd_vl.model.upstream_format import (HF_MODEL_TYPES, PROJECTOR_FILE, UPSTREAM_ARCHITECTURE, ConvertError, Log,
                                            detect_format, load_pickle, read_state_dict)

__all__ = ["HF_MODEL_TYPES", "PROJECTOR_FILE", "UPSTREAM_ARCHITECTURE", "ConvertError", "configure_parser", "convert",
           "convert_hf_to_upstream", "convert_stage1_to_hf", "convert_upstream_to_hf", "detect_format", "find_local",
           "load_pickle", "load_tower_info", "load_upstream_weights", "read_state_dict", "resolve_source", "run"]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, vision_tower: str | None = None,
            base_llm: str | None = None, allow_pickle: bool = False, projector_only: bool = False,
            dtype: str | None = None, template: str | None = None, overwrite: bool = False,
            log: Log = _stderr) -> Path:
    """Convert SRC into DST in the direction SRC's config.json implies (checked against `to` when given)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConvertError(f"{dst}: exists and is not empty (pass --overwrite to write into it)")
    kind = detect_format(src)
    direction = "upstream" if kind == "hf" else "hf"
    if to is not None and to != direction:
        raise ConvertError(f"{src} is {'an HF-native folder' if kind == 'hf' else 'an upstream checkpoint'}; "
                           f"it converts to {direction}, not {to}")
    if projector_only and kind != "hf":
        raise ConvertError("--projector-only applies to HF-native -> upstream conversion")
    if kind == "upstream":
        return convert_upstream_to_hf(src, dst, vision_tower=vision_tower, allow_pickle=allow_pickle, dtype=dtype,
                                      template=template or "qwen_1_5", log=log)
    if kind == "stage1":
        return convert_stage1_to_hf(src, dst, vision_tower=vision_tower, base_llm=base_llm,
                                    allow_pickle=allow_pickle, dtype=dtype, template=template or "plain", log=log)
    return convert_hf_to_upstream(src, dst, projector_only=projector_only, dtype=dtype, log=log)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", metavar="SRC",
                        help="checkpoint folder or hub id to convert (upstream, stage-1 or HF-native)")
    parser.add_argument("dst", metavar="DST", help="output folder (created)")
    parser.add_argument("--to", choices=("hf", "upstream"), default=None,
                        help="expected direction; detected from SRC/config.json, this only checks it")
    parser.add_argument("--vision-tower", metavar="PATH",
                        help="tower folder, preset or hub id overriding mm_vision_tower (config and processor "
                             "settings; stage-1 also takes its weights)")
    parser.add_argument("--base-llm", metavar="PATH",
                        help="stage-1 artifacts: the base LLM (default: _name_or_path of SRC/config.json)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow reading pickled .bin files (mm_projector.bin, pytorch_model.bin) with "
                             "torch.load(weights_only=True); only for files you trust")
    parser.add_argument("--projector-only", action="store_true",
                        help="HF-native -> upstream: write a stage-1 artifact (config.json + mm_projector.bin) "
                             "for upstream's --pretrain_mm_mlp_adapter")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weight dtype of the output (default auto: keep the source's)")
    parser.add_argument("--template", default=None,
                        help="chat template stored with the tokenizer (default: qwen_1_5, plain for stage-1)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")


def run(args: argparse.Namespace) -> int:
    from mlcd_vl.console import quiet_deepspeed_cpu_notice
    from mlcd_vl.model.sources import local_folder

    quiet_deepspeed_cpu_notice()
    src = local_folder(args.src, "SRC")  # a hub id is downloaded (or read from the cache) first
    convert(src, args.dst, to=args.to, vision_tower=args.vision_tower, base_llm=args.base_llm,
            allow_pickle=args.allow_pickle, projector_only=args.projector_only, dtype=args.dtype,
            template=args.template, overwrite=args.overwrite)
    _stderr(f"done: {args.dst}")
    return 0
