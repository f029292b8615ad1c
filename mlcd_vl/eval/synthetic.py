"""Small synthetic benchmark sets in the exact parquet schema of each lmms-eval 0.7.3 benchmark.

    make_synthetic(out, items=8, seed=0) -> {stem: path}

writes `<out>/<stem>.parquet` for chartqa, docvqa_val, infovqa_val, ocrbench and mmmu_val with the columns and
feature types of the hub datasets (`lmms-lab-encoder/ChartQA`, `.../DocVQA` DocVQA and InfographicVQA configs,
`echo840/OCRBench`, `.../MMMU`), written by `datasets` so the `Image()` / `Sequence` features travel in the
parquet schema and lmms-eval gets PIL images back. Images are drawn with PIL: bar charts with their numbers, text
documents, infographics, words and formulas, shapes for MMMU multiple-choice items with `<image k>` references
(in the question and in options) and ids like `validation_Art_1`, as MMMU's aggregation requires.

Same seed, same files: every value comes from one seeded `random.Random` per benchmark.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 220), "orange": (240, 140, 20),
           "purple": (130, 50, 170)}
WORDS = ["river", "garden", "window", "planet", "silver", "market", "candle", "forest", "bridge", "yellow"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _text_image(lines: list[str], size=(360, 240), font_size=20, background=WHITE) -> Image.Image:
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font = _font(font_size)
    for row, line in enumerate(lines):
        draw.text((16, 14 + row * int(font_size * 1.5)), line, fill=BLACK, font=font)
    return image


def features():
    """The `datasets.Features` of each benchmark's evaluation split (hub dataset cards)."""
    from datasets import Features, Sequence, Value
    from datasets import Image as ImageFeature

    s = Value("string")
    return {
        "chartqa": Features({"type": s, "question": s, "answer": s, "image": ImageFeature()}),
        "docvqa_val": Features({"questionId": s, "question": s, "question_types": Sequence(s), "image": ImageFeature(),
                                "docId": Value("int64"), "ucsf_document_id": s, "ucsf_document_page_no": s,
                                "answers": Sequence(s), "data_split": s}),
        "infovqa_val": Features({"questionId": s, "question": s, "answers": Sequence(s), "answer_type": Sequence(s),
                                 "image": ImageFeature(), "image_url": s, "operation/reasoning": Sequence(s),
                                 "ocr": s, "data_split": s}),
        "ocrbench": Features({"dataset": s, "question": s, "question_type": s, "answer": Sequence(s),
                              "image": ImageFeature()}),
        "mmmu_val": Features({"id": s, "question": s, "options": s, "explanation": s,
                              **{f"image_{k}": ImageFeature() for k in range(1, 8)},
                              "img_type": s, "answer": s, "topic_difficulty": s, "question_type": s, "subfield": s}),
    }


# ------------------------------------------------------------------------------------------------ generators


def chartqa_rows(rng: random.Random, items: int) -> list[dict]:
    rows = []
    for i in range(items):
        labels = rng.sample(["2015", "2016", "2017", "2018", "2019", "2020", "2021"], rng.randint(3, 5))
        values = [rng.randint(5, 95) for _ in labels]
        image = Image.new("RGB", (400, 300), WHITE)
        draw, font = ImageDraw.Draw(image), _font(16)
        width = 300 // len(labels)
        for k, (label, value) in enumerate(zip(labels, values)):
            x0, top = 50 + k * width, 260 - value * 2
            draw.rectangle((x0 + 8, top, x0 + width - 8, 260), fill=list(COLOURS.values())[k % len(COLOURS)])
            draw.text((x0 + width // 2, top - 4), str(value), fill=BLACK, font=font, anchor="mb")
            draw.text((x0 + width // 2, 266), label, fill=BLACK, font=font, anchor="mt")
        draw.line((45, 260, 360, 260), fill=BLACK, width=2)
        pick = rng.randrange(len(labels))
        if i % 3 == 2:
            question, answer = "Which year has the highest value?", labels[values.index(max(values))]
        else:
            question, answer = f"What is the value in {labels[pick]}?", str(values[pick])
        rows.append({"type": "human_test" if i % 2 == 0 else "augmented_test", "question": question,
                     "answer": answer, "image": image})
    return rows


def docvqa_rows(rng: random.Random, items: int) -> list[dict]:
    rows = []
    for i in range(items):
        number, total = rng.randint(10000, 99999), f"{rng.randint(100, 9999)}.{rng.randint(0, 99):02d}"
        day, month = rng.randint(1, 28), rng.randint(1, 12)
        name = rng.choice(["A. Smith", "J. Brown", "M. Lopez", "K. Tanaka"])
        image = _text_image(["INVOICE", f"Invoice No: {number}", f"Date: {month:02d}/{day:02d}/1998",
                             f"To: {name}", f"Total: ${total}"], size=(420, 320), font_size=22)
        question, answers, kind = [
            ("What is the invoice number?", [str(number)], ["form"]),
            ("What is the total amount?", [f"${total}", total], ["table/list"]),
            ("To whom is the invoice addressed?", [name], ["layout"]),
            ("What is the date on the invoice?", [f"{month:02d}/{day:02d}/1998"], ["form"]),
        ][i % 4]
        rows.append({"questionId": str(50000 + i), "question": question, "question_types": kind, "image": image,
                     "docId": 4000 + i, "ucsf_document_id": f"{rng.choice('fghjk')}{rng.randint(100, 999)}",
                     "ucsf_document_page_no": str(rng.randint(1, 9)), "answers": answers, "data_split": "val"})
    return rows


def infovqa_rows(rng: random.Random, items: int) -> list[dict]:
    rows = []
    for i in range(items):
        topic = rng.choice(["read books daily", "cycle to work", "own a pet", "work remotely"])
        percent, count = rng.randint(10, 90), rng.randint(2, 40)
        image = Image.new("RGB", (360, 480), (240, 244, 250))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, 360, 70), fill=(40, 70, 140))
        draw.text((180, 35), "SURVEY 2024", fill=WHITE, font=_font(28), anchor="mm")
        draw.text((180, 170), f"{percent}%", fill=(200, 40, 40), font=_font(64), anchor="mm")
        draw.text((180, 240), f"of people {topic}", fill=BLACK, font=_font(20), anchor="mm")
        draw.text((180, 360), f"{count} cities surveyed", fill=BLACK, font=_font(22), anchor="mm")
        if i % 2 == 0:
            question, answers, kind = f"What percentage of people {topic}?", [f"{percent}%", str(percent)], \
                ["single span"]
        else:
            question, answers, kind = "How many cities were surveyed?", [str(count)], ["single span"]
        ocr = f"SURVEY 2024 {percent}% of people {topic} {count} cities surveyed"
        rows.append({"questionId": str(70000 + i), "question": question, "answers": answers, "answer_type": kind,
                     "image": image, "image_url": f"https://example.invalid/infographic_{i}.png",
                     "operation/reasoning": [] if i % 3 else ["counting"], "ocr": ocr, "data_split": "val"})
    return rows


def ocrbench_rows(rng: random.Random, items: int) -> list[dict]:
    kinds = [
        ("IIIT5K", "Regular Text Recognition", "what is written in the image?"),
        ("IC13_857", "Irregular Text Recognition", "what is written in the image?"),
        ("textVQA", "Scene Text-centric VQA", "what is the word on the sign?"),
        ("docVQA", "Doc-oriented VQA", "What is the title of the page?"),
        ("FUNSD", "Key Information Extraction", "What is the name in the form?"),
        ("HME100k", "Handwritten Mathematical Expression Recognition",
         "Please write out the expression of the formula in the image using LaTeX format."),
        ("Non-Semantic Text", "Non-Semantic Text Recognition", "what is written in the image?"),
        ("Digit String", "Digit String Recognition", "what is the number in the image?"),
    ]
    rows = []
    for i in range(items):
        dataset, question_type, question = kinds[i % len(kinds)]
        if dataset == "HME100k":
            a, b = rng.randint(2, 9), rng.randint(1, 9)
            text, answer = f"x^{a} + {b}", [f"x ^ {{ {a} }} + {b}"]
        elif "Digit" in question_type:
            text = str(rng.randint(100000, 999999))
            answer = [text]
        else:
            text = rng.choice(WORDS).upper() if i % 2 else rng.choice(WORDS)
            answer = [text, text.lower()] if text != text.lower() else [text]
        image = _text_image([text], size=(240, 80), font_size=36)
        rows.append({"dataset": dataset, "question": question, "question_type": question_type, "answer": answer,
                     "image": image})
    return rows


def _shape_image(shape: str, colour: str, count: int = 1) -> Image.Image:
    image = Image.new("RGB", (200, 200), WHITE)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    for k in range(count):
        x, y, r = 30 + (k % 3) * 60, 30 + (k // 3) * 60, 22
        box = (x, y, x + 2 * r, y + 2 * r)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x + r, y), (x + 2 * r, y + 2 * r), (x, y + 2 * r)], fill=fill)
    return image


def mmmu_rows(rng: random.Random, items: int) -> list[dict]:
    subjects = ["Art", "Math", "Computer_Science", "Physics", "Economics", "Biology"]
    shapes = ["circle", "square", "triangle"]
    numbers: dict[str, int] = {}
    rows = []
    for i in range(items):
        subject = subjects[i % len(subjects)]
        numbers[subject] = numbers.get(subject, 0) + 1
        images: dict[str, Image.Image | None] = {f"image_{k}": None for k in range(1, 8)}
        kind = i % 4
        if kind == 3:  # open question
            count = rng.randint(2, 6)
            images["image_1"] = _shape_image("circle", "blue", count)
            question, options, answer, qtype = "<image 1> How many circles are there?", [], str(count), "open"
        elif kind == 2:  # images in the options only
            colours = rng.sample(sorted(COLOURS), 3)
            for k, colour in enumerate(colours, start=1):
                images[f"image_{k}"] = _shape_image("square", colour)
            target = rng.randrange(3)
            question = f"Which picture shows a {colours[target]} square?"
            options = [f"<image {k}>" for k in range(1, 4)]
            answer, qtype = "ABC"[target], "multiple-choice"
        elif kind == 1:  # two images in the question
            a, b = rng.sample(range(1, 7), 2)
            images["image_1"], images["image_2"] = _shape_image("square", "red", a), _shape_image("square", "red", b)
            question = "How many more squares are in <image 2> than in <image 1>?"
            right = b - a
            options = [str(right), str(right + 1), str(right - 1), str(a + b)]
            rng.shuffle(options)
            answer, qtype = "ABCD"[options.index(str(right))], "multiple-choice"
        else:
            shape, colour = rng.choice(shapes), rng.choice(sorted(COLOURS))
            images["image_1"] = _shape_image(shape, colour)
            question = "<image 1> What shape is shown in the picture?"
            options = list(shapes) + ["star"]
            rng.shuffle(options)
            answer, qtype = "ABCD"[options.index(shape)], "multiple-choice"
        rows.append({"id": f"validation_{subject}_{numbers[subject]}", "question": question, "options": repr(options),
                     "explanation": "", **images, "img_type": "['Diagrams']", "answer": answer,
                     "topic_difficulty": rng.choice(["Easy", "Medium", "Hard"]), "question_type": qtype,
                     "subfield": subject.replace("_", " ")})
    return rows


GENERATORS = {"chartqa": chartqa_rows, "docvqa_val": docvqa_rows, "infovqa_val": infovqa_rows,
              "ocrbench": ocrbench_rows, "mmmu_val": mmmu_rows}


def make_synthetic(out: str | Path, items: int = 8, seed: int = 0, stems: list[str] | None = None) -> dict[str, Path]:
    """Write `<out>/<stem>.parquet` for each benchmark (all five by default); returns {stem: path}."""
    from datasets import Dataset
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if items < 1:
        raise ValueError(f"items must be at least 1, got {items}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schema = features()
    written = {}
    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        for offset, (stem, generate) in enumerate(GENERATORS.items()):
            if stems is not None and stem not in stems:
                continue
            rows = generate(random.Random(seed * 1000 + offset), items)
            columns = {name: [row[name] for row in rows] for name in schema[stem]}
            path = out / f"{stem}.parquet"
            Dataset.from_dict(columns, features=schema[stem]).to_parquet(str(path))
            written[stem] = path
    finally:
        if not quiet:
            enable_progress_bars()
    return written
