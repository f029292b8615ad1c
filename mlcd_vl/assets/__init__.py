"""Files bundled with the package: the picture the web demo offers as its example, and its question.

The example is one the CPU demo's model answers: a picture from the demo's own distribution (one large shape of one
colour, `demo.playground.shape_item`) and the question form it was taught (the question, then the short-answer line
lmms-eval's ChartQA prompt adds). Any real model answers it too. `demo.png` is drawn by `draw_demo_image`
(regenerate it with
`python -c "from mlcd_vl.assets import draw_demo_image; draw_demo_image().save('mlcd_vl/assets/demo.png')"`).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEMO_IMAGE = ASSETS / "demo.png"
DEMO_QUESTION = "What colour is the shape?\nAnswer the question with a single word."
DEMO_ANSWER = "red"


def draw_demo_image():
    """The bundled picture (112x112): a large red circle on white, as the demo's playground draws its shapes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (112, 112), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((18, 16, 98, 96), fill=(220, 40, 40))
    return image
