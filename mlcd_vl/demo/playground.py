"""Seeded synthetic data for the CPU demo, in the formats the real pipeline reads.

    write_playground(out, train_images=2400, heldout_per_skill=60, seed=0) -> PlaygroundData
    read_playground(out) -> PlaygroundData        # what an earlier write_playground(out, ...) left
    python -m mlcd_vl.demo.playground OUT [--train-images 2400] [--heldout-per-skill 60] [--seed 0]

Layout under `out`:

    images/train/*.png  images/heldout/*.png
    captions.json     stage 1 (plain template): one caption per training image, LLaVA JSON
    chat.json         stage 2 (chat template): single- and multi-turn questions about the same training images
    heldout/<skill>.parquet   scoring: lmms-eval ChartQA schema (type, question, answer, image), held-out images
    heldout.json      the same held-out items as LLaVA JSON (for reading, or for your own scoring)
    corpus.txt        every text line, to train the tiny tokenizer on
    playground.json   seed, sizes, skills, answer sets and chance levels

Skills (answers are one word, so exact match after lmms-eval's ChartQA relaxed accuracy is the score):

    colour       "What colour is the shape?"        one of COLOURS
    shape        "What shape is this?"              one of SHAPES
    count        "How many shapes are there?"       1..MAX_COUNT
    chart        "Which bar is highest?"            the colour naming the highest of four bars (chance 1/4)
    chart_value  "What is the value of the red bar?"   1..9 (written above each bar, also its height)
    word         "What word is written in the image?"   one of WORDS, rendered large

Same seed, same files: one `random.Random(seed)` for training and another for the held-out split; held-out images
are drawn afresh (random sizes, positions and values) and any that is pixel-identical to a training image is
redrawn, so none of them appears in training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30),
           "purple": (140, 50, 180), "orange": (245, 140, 20)}
SHAPES = ["circle", "square", "triangle"]
WORDS = ["cat", "sun", "tree", "moon", "fish", "book", "star", "ship"]
BARS = 4
MAX_COUNT = 4
SKILLS = ("colour", "shape", "count", "chart", "chart_value", "word")
ANSWERS = {"colour": list(COLOURS), "shape": SHAPES, "count": [str(n) for n in range(1, MAX_COUNT + 1)],
           "chart": list(COLOURS), "chart_value": [str(n) for n in range(1, 10)], "word": WORDS}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is this?",
             "count": "How many shapes are there?", "chart": "Which bar is highest?",
             "chart_value": "What is the value of the {label} bar?", "word": "What word is written in the image?"}
SHORT = "\nAnswer the question with a single word."  # lmms-eval ChartQA's post_prompt: the scoring prompt
BACKGROUNDS = [(255, 255, 255), (245, 245, 240), (235, 240, 248)]


def chance(skill: str) -> float:
    """Accuracy of a uniform guess among the skill's answers (chart: among the four bars the image shows)."""
    return 1.0 / BARS if skill == "chart" else 1.0 / len(ANSWERS[skill])


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


# --------------------------------------------------------------------------------------------------- drawings


def shape_item(rng: random.Random) -> tuple[Image.Image, dict]:
    """One large shape of one colour, random size and place."""
    width, height = rng.choice([(112, 112), (112, 84), (84, 112), (96, 96)])
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    side = rng.randint(min(width, height) // 2, min(width, height) - 12)
    x, y = rng.randint(4, width - side - 4), rng.randint(4, height - side - 4)
    _draw_shape(ImageDraw.Draw(image), shape, (x, y, x + side, y + side), COLOURS[colour])
    return image, {"kind": "shape", "colour": colour, "shape": shape}


def count_item(rng: random.Random) -> tuple[Image.Image, dict]:
    """1..MAX_COUNT shapes of one kind and colour in distinct cells of a 3x2 grid."""
    width, height = 168, 112
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    count, colour, shape = rng.randint(1, MAX_COUNT), rng.choice(list(COLOURS)), rng.choice(SHAPES)
    for cell in rng.sample(range(6), count):
        cx, cy = 28 + (cell % 3) * 56, 28 + (cell // 3) * 56
        r = rng.randint(12, 20)
        cx, cy = cx + rng.randint(-4, 4), cy + rng.randint(-4, 4)
        _draw_shape(draw, shape, (cx - r, cy - r, cx + r, cy + r), COLOURS[colour])
    return image, {"kind": "count", "count": count, "colour": colour, "shape": shape}


def chart_item(rng: random.Random) -> tuple[Image.Image, dict]:
    """Four bars of four different colours with their values (1..9) written above; the highest (6..9) stands out
    by 3 or more. Bars are named by their colour: a RoPE-only tower has no absolute positions, so "the leftmost"
    or a letter under a bar would be a reading task, not a chart one."""
    width, height = 112, 112
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    top = rng.randint(6, 9)  # a clear winner: every other bar is at least 3 lower
    values = rng.sample(range(1, top - 2), BARS - 1)
    values.insert(rng.randrange(BARS), top)
    names = rng.sample(list(COLOURS), BARS)
    font = _font(13)
    base, unit, slot = 100, 8, width // BARS
    for k, (name, value) in enumerate(zip(names, values)):
        x0 = k * slot + 5
        y0 = base - value * unit
        draw.rectangle((x0, y0, x0 + slot - 10, base), fill=COLOURS[name])
        draw.text((x0 + (slot - 10) // 2, y0 - 1), str(value), fill=(0, 0, 0), font=font, anchor="mb")
    draw.line((0, base, width, base), fill=(0, 0, 0), width=1)
    return image, {"kind": "chart", "values": dict(zip(names, values)), "highest": names[values.index(top)]}


def word_item(rng: random.Random) -> tuple[Image.Image, dict]:
    """A word from WORDS, rendered large in a dark colour on a light background."""
    width, height = 168, 56
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    word = rng.choice(WORDS)
    ink = rng.choice([(0, 0, 0), (30, 30, 90), (90, 20, 20)])
    ImageDraw.Draw(image).text((width // 2 + rng.randint(-20, 20), height // 2 + rng.randint(-4, 4)), word,
                               fill=ink, font=_font(rng.randint(30, 38)), anchor="mm")
    return image, {"kind": "word", "word": word}


DRAWERS = {"shape": shape_item, "count": count_item, "chart": chart_item, "word": word_item}
KIND_WEIGHTS = {"shape": 3, "count": 2, "chart": 3, "word": 2}  # shape images carry two skills, charts two


# ----------------------------------------------------------------------------------------------- text for items


def caption(meta: dict) -> str:
    kind = meta["kind"]
    if kind == "shape":
        return f"A {meta['colour']} {meta['shape']}."
    if kind == "count":
        plural = "" if meta["count"] == 1 else "s"
        return f"{meta['count']} {meta['colour']} {meta['shape']}{plural}."
    if kind == "chart":
        values = ", ".join(f"{name} {value}" for name, value in meta["values"].items())
        return f"A bar chart: {values}. The {meta['highest']} bar is highest."
    return f"The word {meta['word']} is written in the image."


def questions(meta: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    """(skill, question, one-word answer) pairs this image can answer, in a random order."""
    kind = meta["kind"]
    if kind == "shape":
        pairs = [("colour", QUESTIONS["colour"], meta["colour"]), ("shape", QUESTIONS["shape"], meta["shape"])]
    elif kind == "count":
        pairs = [("count", QUESTIONS["count"], str(meta["count"])), ("colour", QUESTIONS["colour"], meta["colour"])]
    elif kind == "chart":
        label = rng.choice(list(meta["values"]))
        pairs = [("chart", QUESTIONS["chart"], meta["highest"]),
                 ("chart_value", QUESTIONS["chart_value"].format(label=label), str(meta["values"][label]))]
    else:
        pairs = [("word", QUESTIONS["word"], meta["word"])]
    rng.shuffle(pairs)
    return pairs


def conversation(meta: dict, rng: random.Random) -> list[dict]:
    """A stage-2 conversation: one or two question turns (the image in the first), sometimes with a description."""
    pairs = questions(meta, rng)
    turns = pairs[:1] if rng.random() < 0.25 else pairs  # mostly multi-turn: every question the image answers
    messages = []
    for index, (_, question, answer) in enumerate(turns):
        prompt = question + SHORT
        messages.append({"from": "human", "value": f"<image>\n{prompt}" if index == 0 else prompt})
        messages.append({"from": "gpt", "value": answer})
    if rng.random() < 0.15:
        messages.append({"from": "human", "value": "Describe the image."})
        messages.append({"from": "gpt", "value": caption(meta)})
    return messages


# ---------------------------------------------------------------------------------------------------- writing


@dataclass
class PlaygroundData:
    root: Path
    images: Path  # the image folder the LLaVA JSON paths are relative to
    captions: Path
    chat: Path
    heldout: dict[str, Path]  # skill -> parquet
    heldout_json: Path
    corpus: list[str] = field(repr=False, default_factory=list)
    info: dict = field(repr=False, default_factory=dict)


def _draw(rng: random.Random) -> tuple[Image.Image, dict]:
    kinds = [k for k, w in KIND_WEIGHTS.items() for _ in range(w)]
    return DRAWERS[rng.choice(kinds)](rng)


def _fingerprint(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _heldout_items(rng: random.Random, per_skill: int,
                   seen: set[str]) -> dict[str, list[tuple[Image.Image, str, str]]]:
    """`per_skill` (image, question, answer) per skill, each from a freshly drawn image that is not pixel-identical
    to any training image (`seen` holds their fingerprints)."""
    makers = {"colour": shape_item, "shape": shape_item, "count": count_item, "chart": chart_item,
              "chart_value": chart_item, "word": word_item}
    items: dict[str, list] = {}
    for skill in SKILLS:
        rows = []
        while len(rows) < per_skill:
            image, meta = makers[skill](rng)
            if _fingerprint(image) in seen:
                continue
            pair = next(p for p in questions(meta, rng) if p[0] == skill)
            rows.append((image, pair[1], pair[2]))
        items[skill] = rows
    return items


def write_playground(out: str | Path, train_images: int = 2400, heldout_per_skill: int = 60, seed: int = 0,
                     progress: bool = False) -> PlaygroundData:
    """Write the training and held-out data under `out` (see the module docstring); returns where it went."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from tqdm.auto import tqdm

    out = Path(out)
    image_root = out / "images"
    (image_root / "train").mkdir(parents=True, exist_ok=True)
    (image_root / "heldout").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, chat, corpus, seen = [], [], [], set()
    for index in tqdm(range(train_images), desc="drawing training images", unit="img", disable=not progress):
        image, meta = _draw(rng)
        name = f"train/{index:05d}_{meta['kind']}.png"
        image.save(image_root / name)
        seen.add(_fingerprint(image))
        text = caption(meta)
        captions.append({"id": f"cap-{index:05d}", "image": name,
                         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": text}]})
        messages = conversation(meta, rng)
        chat.append({"id": f"qa-{index:05d}", "image": name, "conversations": messages})
        corpus.append(text)
        corpus.extend(m["value"].replace("<image>\n", "") for m in messages)

    held_rng = random.Random(seed + 7919)
    schema = Features({"type": Value("string"), "question": Value("string"), "answer": Value("string"),
                       "image": ImageFeature()})
    heldout, heldout_json = {}, []
    (out / "heldout").mkdir(exist_ok=True)
    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        for skill, rows in tqdm(_heldout_items(held_rng, heldout_per_skill, seen).items(), desc="held-out sets",
                                unit="skill", disable=not progress):
            for k, (image, question, answer) in enumerate(rows):
                name = f"heldout/{skill}_{k:03d}.png"
                image.save(image_root / name)
                heldout_json.append({"id": f"{skill}-{k:03d}", "skill": skill, "image": name, "conversations": [
                    {"from": "human", "value": f"<image>\n{question}{SHORT}"}, {"from": "gpt", "value": answer}]})
            columns = {"type": ["human_test"] * len(rows), "question": [q for _, q, _ in rows],
                       "answer": [a for _, _, a in rows], "image": [im for im, _, _ in rows]}
            path = out / "heldout" / f"{skill}.parquet"
            Dataset.from_dict(columns, features=schema).to_parquet(str(path))
            heldout[skill] = path
    finally:
        if not quiet:
            enable_progress_bars()

    corpus = sorted(set(corpus)) + [SHORT.strip(), "Describe the image.", " ".join(WORDS), " ".join(COLOURS)]
    info = {"seed": seed, "train_images": train_images, "heldout_per_skill": heldout_per_skill,
            "skills": {s: {"question": QUESTIONS[s], "answers": ANSWERS[s], "chance": chance(s)} for s in SKILLS}}
    paths = PlaygroundData(out, image_root, out / "captions.json", out / "chat.json", heldout, out / "heldout.json",
                           corpus, info)
    paths.captions.write_text(json.dumps(captions, indent=0))
    paths.chat.write_text(json.dumps(chat, indent=0))
    paths.heldout_json.write_text(json.dumps(heldout_json, indent=0))
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    files = {"images": "images", "captions": paths.captions.name, "chat": paths.chat.name,
             "heldout_json": paths.heldout_json.name, "heldout": {s: f"heldout/{p.name}" for s, p in heldout.items()}}
    (out / "playground.json").write_text(json.dumps({**info, "files": files}, indent=2) + "\n")
    return paths


def read_playground(out: str | Path) -> PlaygroundData:
    """The data an earlier `write_playground(out, ...)` left (its `playground.json` says where each file is)."""
    out = Path(out)
    info = json.loads((out / "playground.json").read_text())
    files = info.pop("files")
    corpus = (out / "corpus.txt").read_text().splitlines()
    return PlaygroundData(out, out / files["images"], out / files["captions"], out / files["chat"],
                          {skill: out / path for skill, path in files["heldout"].items()}, out / files["heldout_json"],
                          corpus, info)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mlcd_vl.demo.playground",
                                     description="Write the demo's synthetic data (training + held-out).")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--train-images", type=int, default=2400)
    parser.add_argument("--heldout-per-skill", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = write_playground(args.out, train_images=args.train_images, heldout_per_skill=args.heldout_per_skill,
                            seed=args.seed, progress=True)
    print(f"stage 1: {data.captions}\nstage 2: {data.chat}\nimages:  {data.images}")
    for skill, path in data.heldout.items():
        print(f"held-out {skill}: {path}")


if __name__ == "__main__":
    main()
