"""Shared helpers of the benchmark scripts: machine name, dated result path, software versions, load average,
the small stage-2 model and a synthetic LLaVA-NeXT-Data-shaped record set.

Every result file is `bench/results/<what>_<machine>_<YYYY-MM-DD>.md` (or under `--out DIR`) and records the load
average, because this machine is shared and other work slows every timing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine_name(device: str | None = None) -> str:
    """`cpu-<n>core`, or the CUDA card's name as a slug (`nvidia-h100-80gb-hbm3`) when `device` is cuda."""
    import torch

    if device == "cuda" or (device is None and torch.cuda.is_available()):
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return slug(name)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def result_path(out: str | os.PathLike, what: str, machine: str | None = None) -> Path:
    """`<out>/<what>_<machine>_<YYYY-MM-DD>.md` (UTC date); the folder is created."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{what}_{machine or machine_name()}_{today()}.md"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def versions() -> str:
    """One line: Python, torch (threads), transformers, NumPy, Pillow, CPU architecture."""
    import numpy
    import PIL
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, NumPy {numpy.__version__}, Pillow {PIL.__version__}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs")


def header(title: str, command: str, load_before: str, extra: list[str] | None = None) -> list[str]:
    """The common top of a result file."""
    lines = [f"# {title}: {machine_name()}, {today()}", "", f"- command: `{command}`", f"- software: {versions()}",
             f"- load average (1, 5, 15 min) before: {load_before}; after: {load_average()} "
             f"(other work on this shared machine slows every timing; compare rows of one file only)"]
    return lines + [f"- {line}" for line in (extra or [])] + [""]


def write_result(path: Path, lines: list[str], echo: bool = True) -> Path:
    """Write the result file; `echo` also prints it (a script that saves partial results as it goes passes False)."""
    path.write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))
        print(f"\nwrote {path}")
    return path


def write_json(path: Path, data: dict) -> Path:
    """The machine-readable twin of a result file: `<result>.json` beside `<result>.md` (NaN and inf as null)."""
    import math

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    target = Path(path).with_suffix(".json")
    target.write_text(json.dumps(clean(data), indent=1) + "\n")
    return target


NO_CUDA_EXIT = 2


def cuda_missing(script: str) -> bool:
    """True (after a one-line message on stderr) when there is no CUDA device: the GPU scripts then exit with
    NO_CUDA_EXIT unless --dry-run."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA device here (torch.cuda.is_available() is False). Run it on an H100/H200 machine, or "
          "use --dry-run to check the code path on CPU.", file=sys.stderr)
    return True


def extract_package(revision: str, folder: Path) -> Path:
    """The `mlcd_vl` package as of a git revision, extracted under `folder` (a "before" for a side-by-side run:
    put `folder` first on PYTHONPATH)."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "mlcd_vl"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def command_line(script: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{script}", *args])


# ----------------------------------------------------------------------------------------------------------------
# The small stage-2 model of the CPU benchmarks
# ----------------------------------------------------------------------------------------------------------------

def small_shapes():
    """A 4-layer Qwen2 of width 256 with a 4-layer MLCD (RoPE2D) tower at 112 px (8x8 patches of 14 px)."""
    from mlcd_vl.model.tiny import TinyShapes

    return TinyShapes(llm_hidden=256, llm_layers=4, llm_heads=4, llm_kv_heads=2, llm_intermediate=1024,
                      tower_hidden=128, tower_layers=4, tower_heads=2, tower_intermediate=512, image_size=112,
                      patch_size=14)


def build_small_vlm(root: Path, shapes=None, seed: int = 0):
    """(model, tokenizer, settings): the anyres + spatial_unpad composite over the tiny assets at `shapes`, with
    upstream's 5-pinpoint grid at the tower's crop size. Float32, eval mode off (training)."""
    from mlcd_vl.model import tiny
    from mlcd_vl.model.build import build_vlm

    shapes = shapes or small_shapes()
    assets = tiny.write_tiny_assets(root / "assets", corpus=corpus(), shapes=shapes, seed=seed)
    return build_vlm(tiny.tiny_spec(assets, shapes=shapes, seed=seed))


# ----------------------------------------------------------------------------------------------------------------
# Synthetic records shaped like LLaVA-NeXT-Data
# ----------------------------------------------------------------------------------------------------------------

_WORDS = ("the a red green blue yellow circle square triangle chart bar value left right top bottom shows image "
          "picture how many what which colour number text label highest lowest is are there of in on and with "
          "it has two three four five describe caption answer question").split()

# (width, height) of the synthetic images and their weights: photos in landscape and portrait, wide charts,
# tall documents, small thumbnails (LLaVA-NeXT-Data mixes all of them).
ASPECTS = [((640, 480), 4), ((480, 640), 2), ((800, 600), 2), ((1024, 512), 1), ((512, 1024), 1), ((600, 600), 2),
           ((1200, 400), 1), ((400, 1200), 1), ((320, 240), 1)]


def corpus() -> list[str]:
    from mlcd_vl.model.tiny import default_corpus

    return default_corpus() + [" ".join(_WORDS)]


@dataclass(frozen=True)
class Mixture:
    """How the synthetic set is drawn (fractions of records)."""

    text_only: float = 0.10  # no image
    multi_turn: float = 0.20  # the long tail: 2 to 8 question/answer turns
    long_answer: float = 0.25  # single-turn with a detailed (30-150 word) answer instead of a short one


MIXTURES = {
    "llava-next": Mixture(),  # the default shape (module docstring of make_records)
    # A heavier tail for a sensitivity check: more text-only and multi-turn records, as in mixes that add
    # ShareGPT-style conversations; NeMo describes LLaVA mixes as Zipf-skewed. Not a claim about one dataset.
    "long-tail": Mixture(text_only=0.25, multi_turn=0.35, long_answer=0.25),
}


def _sentence(rng, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS, size=int(rng.integers(low, high + 1)))).capitalize() + "."


def make_records(folder: Path, count: int, seed: int = 0, mixture: Mixture = Mixture(),
                 image_format: str = "PNG") -> Path:
    """`count` records (LLaVA `conversations` JSON) and their images under `folder`; returns the JSON path.

    Many short single-turn samples (a question of 5-15 words, an answer of 1-12 words), a quarter with detailed
    answers, a long tail of multi-turn conversations and some text-only ones; images of mixed aspect ratios
    (noise plus shapes, so they compress like photos rather than flat colour).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    sizes, weights = zip(*ASPECTS)
    probs = np.array(weights, dtype=float) / sum(weights)
    records = []
    for index in range(count):
        kind = rng.random()
        text_only = kind < mixture.text_only
        multi = mixture.text_only <= kind < mixture.text_only + mixture.multi_turn
        turns = int(rng.integers(2, 9)) if multi else 1
        conversations = []
        for turn in range(turns):
            question = _sentence(rng, 5, 15)
            if turn == 0 and not text_only:
                question = "<image>\n" + question
            detailed = (not multi and rng.random() < mixture.long_answer / (1 - mixture.multi_turn)) or text_only
            answer = _sentence(rng, 30, 150) if detailed else _sentence(rng, 1, 12 if not multi else 40)
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        record = {"id": f"synthetic-{index}", "conversations": conversations}
        if not text_only:
            size = sizes[int(rng.choice(len(sizes), p=probs))]
            name = f"images/{index}.{'jpg' if image_format == 'JPEG' else 'png'}"
            noise_image(size, rng).save(folder / name, image_format, **({"quality": 90} if image_format == "JPEG"
                                                                        else {}))
            record["image"] = name
        records.append(record)
    path = folder / "records.json"
    path.write_text(json.dumps(records))
    return path


def noise_image(size: tuple[int, int], rng):
    """RGB noise around a random colour plus a few filled shapes (compresses like a photo, not like a flat fill)."""
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = size
    base = rng.integers(0, 256, size=3)
    array = np.clip(base + rng.normal(0, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(array, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image
