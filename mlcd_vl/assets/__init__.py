"""Files bundled with the package: the picture the web demo offers as its example, and its question.

`demo.png` is drawn by `draw_demo_image` (regenerate it with
`python -c "from mlcd_vl.assets import draw_demo_image; draw_demo_image().save('mlcd_vl/assets/demo.png')"`).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEMO_IMAGE = ASSETS / "demo.png"
DEMO_QUESTION = "What shapes and colours are in this picture?"


def draw_demo_image():
    """The bundled picture (320x240): a red circle, a blue square and the word "MLCD"."""
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
