"""Quick-start demo: build the tiny model, save and reload it, and answer one question about the bundled image.

Everything happens locally on the CPU in a few seconds: a tiny Qwen2 LLM and tokenizer and a tiny MLCD tower are
written (`model.tiny`), composed into a LLaVA-NeXT model with anyres + spatial_unpad, saved as an HF-native folder,
reloaded through the serving engine, and asked about `mlcd_vl/assets/demo.png`. The weights are random, so the answer
is gibberish; it shows the whole path (pixels -> anyres crops -> visual tokens -> generation) works on this machine.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "demo.png"
DEMO_QUESTION = "What shapes and colours are in this picture?"


def default_workdir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mlcd-vl" / "demo"


def draw_demo_image():
    """The bundled picture (320x240): a red circle, a blue square and the word "MLCD". Used if the file is missing,
    and to regenerate it: `python -c "from mlcd_vl.demo import draw_demo_image; draw_demo_image().save(...)"`."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (320, 240), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((24, 40, 124, 140), fill=(220, 30, 30))
    draw.rectangle((190, 40, 290, 140), fill=(30, 60, 220))
    try:
        font = ImageFont.load_default(size=44)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        font = ImageFont.load_default()
    draw.text((160, 195), "MLCD", fill=(0, 0, 0), font=font, anchor="mm")
    return image


def tiny_pinpoints(crop_size: int) -> list[tuple[int, int]]:
    """Upstream's five-crop grid (1x2, 2x1, 2x2, 3x1, 1x3) at the tiny tower's crop size, (width, height)."""
    s = crop_size
    return [(s, 2 * s), (2 * s, s), (2 * s, 2 * s), (3 * s, s), (s, 3 * s)]


def build_tiny_model(workdir: Path) -> Path:
    """Write the tiny assets, compose the anyres VLM and save it; returns the model folder."""
    from mlcd_vl.model import tiny
    from mlcd_vl.model.build import VLMSpec, build_vlm
    from mlcd_vl.model.checkpoint import save_vlm

    paths = tiny.write_tiny_assets(workdir / "assets")
    spec = VLMSpec(llm=str(paths["llm"]), tower=str(paths["tower"]), image_mode="anyres",
                   merge_type="spatial_unpad", pinpoints=tiny_pinpoints(tiny.TinyShapes().image_size))
    model, tokenizer, settings = build_vlm(spec)
    return save_vlm(model, tokenizer, settings, workdir / "model")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"where the tiny model is written (default {default_workdir()})")
    parser.add_argument("--question", default=DEMO_QUESTION, help="what to ask about the bundled image")
    parser.add_argument("--max-new-tokens", type=int, default=24)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from mlcd_vl.serve.engine import Engine, GenerationSettings, Request

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    workdir = Path(args.workdir or default_workdir()).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"Building the tiny model (random weights) in {workdir} ...")
    folder = build_tiny_model(workdir)
    engine = Engine.from_pretrained(folder, device="cpu")
    image = DEMO_IMAGE if DEMO_IMAGE.is_file() else draw_demo_image()
    request = Request([{"role": "user", "content": f"<image>\n{args.question}"}], [image])
    prompt = engine.prepare(request)
    visual = sum(1 for token in prompt.input_ids if token == engine.image_token_id)
    result = engine.generate([request], GenerationSettings(max_new_tokens=args.max_new_tokens))[0]
    size = prompt.images[0].size
    print(f"Model:    {folder} ({type(engine.model).__name__}, {engine.settings.image_mode}, "
          f"{engine.settings.merge_type})")
    print(f"Image:    {DEMO_IMAGE.name} {size[0]}x{size[1]}, {prompt.images[0].crops.shape[0]} crops, "
          f"{visual} visual tokens")
    print(f"Question: {args.question}")
    print(f"Answer:   {result.text!r}")
    print(f"Tokens:   {result.prompt_tokens} prompt, {result.completion_tokens} generated ({result.finish_reason})")
    print("Note: the weights are random (the tiny model is untrained), so the answer is meaningless; the training "
          "demo that teaches the tiny model to answer is not part of this command yet.")
    return 0
