"""The demo's bundled picture and its untrained tiny anyres model, which the tests, benches and web demo share.

`mlcd_vl.demo` re-exports every name here; import them from there.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "demo.png"
DEMO_QUESTION = "What shapes and colours are in this picture?"


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
    """Write the (untrained) tiny assets, compose the anyres VLM and save it; returns the model folder."""
    from mlcd_vl.model import tiny
    from mlcd_vl.model.build import VLMSpec, build_vlm
    from mlcd_vl.model.checkpoint import save_vlm

    paths = tiny.write_tiny_assets(workdir / "assets")
    spec = VLMSpec(llm=str(paths["llm"]), tower=str(paths["tower"]), image_mode="anyres",
                   merge_type="spatial_unpad", pinpoints=tiny_pinpoints(tiny.TinyShapes().image_size))
    model, tokenizer, settings = build_vlm(spec)
    return save_vlm(model, tokenizer, settings, workdir / "model")
