"""The `tiny` preset: small random models and a small tokenizer, built locally for CPU tests and the demo.

It writes ordinary folders in the layout of the real hub repos, so every loading path (build, convert, train,
serve) is exercised exactly as with `Qwen/Qwen2.5-7B-Instruct` and `DeepGlint-AI/mlcd-vit-bigG-patch14-448`:

- a Qwen2-shaped byte-level BPE tokenizer (Qwen's pre-tokenizer split, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`)
  trained on a corpus the caller gives (default: a built-in English corpus about colours, shapes and numbers);
- a Qwen2ForCausalLM of a few layers;
- an MLCD-style RoPE2D tower (`MLCDVisionModel`), a CLIP-format tower (QuickGELU) or a SigLIP tower (no CLS token),
  with its image-processor config; `write_preset_tower` makes one with a shrunk tower preset's settings.

`tiny_spec` composes them as a VLM over upstream's five-crop grid at the tiny crop size (`presets.upstream_grid`),
and `build_tiny_vlm` saves that untrained anyres model as an HF-native folder: what `mlcd-vl build --tiny`, the
tests (through `tests/conftest.py`) and the benches use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, GenerationConfig, MLCDVisionConfig,
                          MLCDVisionModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor,
                          SiglipVisionConfig, SiglipVisionModel)

from mlcd_vl.model.build import VLMSpec, build_vlm
from mlcd_vl.model.pixels import ProcessorSettings
from mlcd_vl.presets import SIGLIP_MEAN, SIGLIP_STD, TowerPreset, upstream_grid

# Qwen2's pre-tokenizer pattern: contractions, letters, single digits, punctuation runs, whitespace.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "pink", "brown", "cyan"]
_SHAPES = ["circle", "square", "triangle", "star", "bar", "line", "dot", "box"]
_WORDS = ["image", "picture", "chart", "value", "colour", "shape", "text", "word", "number", "answer", "question",
          "what", "which", "how", "many", "is", "the", "a", "of", "in", "on", "there", "this", "shows", "appear",
          "largest", "smallest", "left", "right", "top", "bottom", "yes", "no", "and", "with", "write", "short",
          "caption", "describe", "read", "label", "bars", "highest", "lowest", "it", "has", "two", "colours"]


def default_corpus() -> list[str]:
    """A deterministic English corpus covering the demo's vocabulary (colours, shapes, digits, chat phrasing)."""
    lines = []
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            lines.append(f"A {colour} {shape} is on the {['left', 'right', 'top', 'bottom'][(i + j) % 4]}.")
            lines.append(f"What colour is the {shape}? It is {colour}.")
            lines.append(f"How many {shape}s are there? There are {(i * 7 + j) % 10} {shape}s.")
    for n in range(200):
        lines.append(f"The value of bar {n % 7} is {n}. The answer is {n * 3 % 97}.")
    lines.append(" ".join(_WORDS))
    lines.append("You are a helpful assistant.")
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A Qwen2-shaped byte-level BPE tokenizer: BPE ids first, then the three special tokens (pad = <|endoftext|>)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=32768, padding_side="right",
        clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class TinyShapes:
    """Sizes of the tiny models (defaults give a few hundred thousand parameters each)."""

    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128
    vocab_padding: int = 32  # embedding rows beyond the tokenizer, as Qwen2.5 has
    tower_hidden: int = 32
    tower_layers: int = 3
    tower_heads: int = 2
    tower_intermediate: int = 64
    image_size: int = 56
    patch_size: int = 14


def write_tiny_llm(folder: str | Path, tokenizer: PreTrainedTokenizerFast, shapes: TinyShapes = TinyShapes(),
                   seed: int = 0) -> Path:
    folder = Path(folder)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + shapes.vocab_padding, hidden_size=shapes.llm_hidden,
        intermediate_size=shapes.llm_intermediate, num_hidden_layers=shapes.llm_layers,
        num_attention_heads=shapes.llm_heads, num_key_value_heads=shapes.llm_kv_heads, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY_TOWER_ACTS = {"mlcd": "gelu", "clip": "quick_gelu", "siglip": "gelu_pytorch_tanh"}  # as the real towers


def write_tiny_tower(folder: str | Path, kind: str = "mlcd", shapes: TinyShapes = TinyShapes(), seed: int = 0, *,
                     image: ProcessorSettings | None = None, hidden_act: str | None = None) -> Path:
    """A tiny random tower of a real class with its image-processor config: an MLCD RoPE2D tower (`kind="mlcd"`),
    a CLIP-format one (`"clip"`, QuickGELU) or a SigLIP one without CLS token (`"siglip"`).

    `image` sets the crop size, resize mode and mean/std (default at the tiny size: SigLIP's squash resize and 0.5
    mean/std for SigLIP, CLIP's shortest-edge resize and statistics for the others)."""
    if kind not in TINY_TOWER_ACTS:
        raise ValueError(f"unknown tiny tower kind {kind!r}; use one of {', '.join(TINY_TOWER_ACTS)}")
    folder = Path(folder)
    if image is None:
        siglip = dict(mean=SIGLIP_MEAN, std=SIGLIP_STD, resize_mode="squash") if kind == "siglip" else {}
        image = ProcessorSettings(shapes.image_size, shapes.patch_size, **siglip)
    torch.manual_seed(seed)
    common = dict(hidden_size=shapes.tower_hidden, intermediate_size=shapes.tower_intermediate,
                  num_hidden_layers=shapes.tower_layers, num_attention_heads=shapes.tower_heads,
                  image_size=image.crop_size, patch_size=shapes.patch_size, layer_norm_eps=1e-5,
                  hidden_act=hidden_act or TINY_TOWER_ACTS[kind])
    if kind == "mlcd":
        model = MLCDVisionModel(MLCDVisionConfig(**common))
    elif kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**common))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**common))
    model.save_pretrained(folder)
    crop = {"height": image.crop_size, "width": image.crop_size}
    processor_kwargs = dict(image_mean=list(image.mean), image_std=list(image.std), resample=3)
    if kind == "siglip":  # SiglipImageProcessor always resizes straight to its size
        if image.resize_mode != "squash":
            raise ValueError("a SigLIP tower's processor resizes to height x width: use resize mode 'squash'")
        SiglipImageProcessor(size=crop, **processor_kwargs).save_pretrained(folder)
    elif image.resize_mode == "squash":
        CLIPImageProcessor(size=crop, crop_size=crop, do_center_crop=False, **processor_kwargs).save_pretrained(folder)
    else:
        CLIPImageProcessor(size={"shortest_edge": image.crop_size}, crop_size=crop,
                           **processor_kwargs).save_pretrained(folder)
    return folder


def write_preset_tower(folder: str | Path, preset: TowerPreset, shapes: TinyShapes = TinyShapes(),
                       seed: int = 0) -> Path:
    """A tiny random tower of a (shrunk) preset's class, activation and image settings; see `TowerPreset.shrunk`."""
    shapes = replace(shapes, tower_hidden=preset.hidden_size, patch_size=preset.patch_size)
    return write_tiny_tower(folder, preset.kind, shapes, seed, image=ProcessorSettings.of_tower(preset),
                            hidden_act=preset.hidden_act)


def write_tiny_assets(root: str | Path, *, corpus: list[str] | None = None, shapes: TinyShapes = TinyShapes(),
                      tower_kind: str = "mlcd", seed: int = 0) -> dict[str, Path]:
    """Write `llm/` and `tower/` under root (reused when already there) and return their paths."""
    root = Path(root)
    llm_dir, tower_dir = root / "llm", root / f"tower-{tower_kind}"
    stamp = {"shapes": shapes.__dict__, "tower_kind": tower_kind, "seed": seed, "corpus_lines": len(corpus or [])}
    stamp_file = root / "tiny.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and (llm_dir / "config.json").is_file() \
            and (tower_dir / "config.json").is_file():
        return {"llm": llm_dir, "tower": tower_dir}
    tokenizer = train_tokenizer(corpus or default_corpus())
    write_tiny_llm(llm_dir, tokenizer, shapes, seed)
    write_tiny_tower(tower_dir, tower_kind, shapes, seed + 1)
    stamp_file.write_text(json.dumps(stamp))
    return {"llm": llm_dir, "tower": tower_dir}


def tiny_spec(assets: dict[str, Path], image_mode: str = "anyres", merge_type: str = "spatial_unpad",
              shapes: TinyShapes = TinyShapes(), **spec) -> VLMSpec:
    """The VLM over tiny assets; anyres modes get upstream's five-crop grid at the tiny crop size."""
    pinpoints = upstream_grid(shapes.image_size) if merge_type != "flat" else None
    return VLMSpec(llm=str(assets["llm"]), tower=str(assets["tower"]), image_mode=image_mode, merge_type=merge_type,
                   pinpoints=pinpoints, **spec)


def build_tiny_vlm(root: str | Path) -> Path:
    """Write the tiny assets under `root`, compose the untrained anyres VLM and save it to `root/model`."""
    from mlcd_vl.model.checkpoint import save_vlm

    root = Path(root)
    model, tokenizer, settings = build_vlm(tiny_spec(write_tiny_assets(root / "assets")))
    return save_vlm(model, tokenizer, settings, root / "model")
