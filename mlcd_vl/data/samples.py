"""Record -> training sample: the label builder (upstream `train.py`'s preprocessing, made exact).

One pass per record, in this order, cheapest checks first:

1. parse: id, image references, turns (LLaVA `from/value` or `role/content`); upstream's `preprocess_multimodal`
   (a single `<image>` not at the start of its turn moves to the front as `<image>\\n` + rest);
2. images: opened once (or, for `measure`, only their headers), sizes -> exact visual-token counts
   (`anyres.image_layout`, the same numbers `multimodal.expected_tokens` gives the model);
3. render the template once, tokenize the whole string once with offsets, label each token from the segment its
   characters come from; `label_mode="upstream"` reproduces upstream's quirk instead (assistant turns with their
   header trained, newline / `<|im_start|>` / `<|im_end|>` un-masked everywhere, ids looked up in the tokenizer);
4. expand each `<image>` token to its count of image tokens, truncate to `max_length` (never inside an image
   block), require at least one supervised token; only then run the pixel processing for the kept images.

Any failure raises `RecordProblem` with a `Problem` reason; the dataset turns it into a skip or, in strict mode, an
error naming the record.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mlcd_vl.data.config import DataConfig
from mlcd_vl.data.problems import Problem, RecordProblem
from mlcd_vl.data.sources import SourceRecord
from mlcd_vl.model.templates import Message, TemplateError, get_template, normalize_messages
from mlcd_vl.model import anyres, pixels
from mlcd_vl.model.build import VLMSettings
from mlcd_vl.model.multimodal import ImageInput, expected_tokens
from mlcd_vl.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER, expand_image_tokens



@dataclass
class Sample:
    """A training sample: ids with every image expanded to its visual tokens, labels, and the images in order."""

    record_id: str
    input_ids: torch.Tensor  # long [L]
    labels: torch.Tensor  # long [L], IGNORE_INDEX where not trained
    images: list[ImageInput]
    image_spans: list[tuple[int, int]]  # (start, length) of each image's token block
    truncated: bool = False

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def modality(self) -> str:
        return "image" if self.images else "text"


@dataclass
class SampleStats:
    """What `measure` learns about a record without pixel work: lengths for grouping, packing and reports."""

    record_id: str
    length: int
    text_tokens: int
    visual_tokens: list[int] = field(default_factory=list)
    supervised_tokens: int = 0
    truncated: bool = False
    fingerprint: int = 0  # `record_fingerprint`: equal for records with the same id and content

    @property
    def modality(self) -> str:
        return "image" if self.visual_tokens else "text"


@dataclass
class _Tokens:
    ids: np.ndarray
    labels: np.ndarray
    spans: list[tuple[int, int]]
    truncated: bool


_NOISE = "QA_GT_caption_based_noisy"


def _move_image_to_front(content: str) -> str:
    """Upstream preprocess_multimodal: a lone `<image>` not at the start becomes `<image>\\n` + the stripped rest."""
    if content.count(IMAGE_PLACEHOLDER) == 1 and not content.startswith(IMAGE_PLACEHOLDER):
        content = (IMAGE_PLACEHOLDER + "\n" + content.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
    return content.replace(_NOISE, "")


def _orientation(image: Image.Image) -> int | None:
    """EXIF orientation without decoding (PNG's getexif() would load the pixels to look past IDAT)."""
    if image.format in ("JPEG", "MPO", "TIFF", "WEBP") or "exif" in image.info:
        return image.getexif().get(0x0112)
    return None


def _image_refs(record: dict) -> list:
    refs = record.get("image")
    if refs is None:
        refs = record.get("images")
    if refs is None:
        return []
    return list(refs) if isinstance(refs, (list, tuple)) else [refs]


class SampleBuilder:
    """Turns records into `Sample`s (or `SampleStats`) for one tokenizer, model settings and data config."""

    def __init__(self, tokenizer, settings: VLMSettings, config: DataConfig):
        self.tokenizer, self.settings, self.config = tokenizer, settings, config
        self.template = get_template(config.template or settings.template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError("the tokenizer has no <image> token; load it with model.build.load_tokenizer")
        self.unmasked_ids = np.array([self._single_id(t) for t in self.template.upstream_unmasked_tokens], np.int64)

    def _single_id(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not a single token for this tokenizer ({ids}); upstream labels need one")
        return ids[0]

    # ---- step 1: records -> messages and image references
    def parse(self, source: SourceRecord) -> tuple[str, list[Message], list]:
        record, record_id = source.record, record_id_of(source)
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise RecordProblem(Problem.BAD_RECORD, "no `conversations` list")
        try:
            messages = normalize_messages(record["conversations"])
        except TemplateError as error:
            raise RecordProblem(Problem.BAD_CONVERSATION, str(error)) from None
        keep_system = self.config.label_mode == "default"
        if messages and messages[0].role != "user" and not (keep_system and messages[0].role == "system"):
            messages = messages[1:]  # upstream skips a first turn that is not from the human
        roles = {m.role for m in messages}
        if "user" not in roles or "assistant" not in roles:
            raise RecordProblem(Problem.BAD_CONVERSATION, "needs at least one human and one gpt turn")
        answers = [m.content for m in messages if m.role == "assistant"]
        empty = next((n for n, text in enumerate(answers, start=1) if not text.strip()), None)
        if empty is not None:
            raise RecordProblem(Problem.EMPTY_ANSWER, f"gpt turn {empty} of {len(answers)} is empty or whitespace")
        if messages[-1].role == "user":
            raise RecordProblem(Problem.ENDS_ON_USER_TURN, "the last turn is a human turn without an answer")
        refs = _image_refs(record)
        if refs and self.config.image_to_front:
            messages = [Message(m.role, _move_image_to_front(m.content)) for m in messages]
        placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders != len(refs):
            raise RecordProblem(Problem.IMAGE_COUNT_MISMATCH,
                                f"{placeholders} <image> placeholder(s) but {len(refs)} image(s)")
        return record_id, messages, refs

    # ---- step 2: images
    def image_mode(self, count: int) -> str:
        multi = self.config.multi_image_mode
        return multi if count > 1 and multi != "model" else self.settings.image_mode

    def visual_tokens(self, size: tuple[int, int], mode: str) -> int:
        s = self.settings
        return anyres.image_layout(size, image_mode=mode, merge_type=s.merge_type, crop_size=s.crop_size,
                                   patch_size=s.patch_size, pinpoints=s.pinpoints).tokens

    def _locate(self, ref, folder: str | None):
        """The thing `load_rgb` opens, after the missing / empty checks that name the reason exactly."""
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, Image.Image):
            return ref
        if isinstance(ref, (bytes, bytearray)):
            if not ref:
                raise RecordProblem(Problem.IMAGE_EMPTY, "empty image bytes")
            return bytes(ref)
        if not isinstance(ref, str) or not ref:
            raise RecordProblem(Problem.IMAGE_MISSING, f"no usable image reference ({type(ref).__name__})")
        path = os.path.join(folder, ref) if folder and not os.path.isabs(ref) else ref
        if not os.path.isfile(path):
            raise RecordProblem(Problem.IMAGE_MISSING, f"{path}: image file not found")
        if os.path.getsize(path) == 0:
            raise RecordProblem(Problem.IMAGE_EMPTY, f"{path}: image file is empty")
        return path

    def load_image(self, ref, folder: str | None) -> Image.Image:
        located = self._locate(ref, folder)
        try:
            return pixels.load_rgb(located, max_pixels=self.config.max_image_pixels,
                                   upstream_convert=self.config.upstream_image_convert)
        except pixels.ImageError as error:
            kind = Problem.IMAGE_TOO_LARGE if "pixel limit" in str(error) else Problem.IMAGE_UNREADABLE
            raise RecordProblem(kind, str(error)) from None

    def image_size(self, ref, folder: str | None) -> tuple[int, int]:
        """(width, height) as `load_image` would return it, from the header only (EXIF rotation applied)."""
        located = self._locate(ref, folder)
        if isinstance(located, Image.Image):
            return located.size
        try:
            with Image.open(located if isinstance(located, str) else io.BytesIO(located)) as image:
                width, height = image.size
                rotated = not self.config.upstream_image_convert and _orientation(image) in (5, 6, 7, 8)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise RecordProblem(Problem.IMAGE_UNREADABLE, f"cannot read image header ({error})") from None
        if width * height > self.config.max_image_pixels:
            raise RecordProblem(Problem.IMAGE_TOO_LARGE,
                                f"{width}x{height} exceeds the {self.config.max_image_pixels}-pixel limit")
        return (height, width) if rotated else (width, height)

    # ---- step 3 and 4: text -> ids and labels
    def tokenize(self, messages: list[Message], counts: list[int]) -> _Tokens:
        try:
            segments = self.template.segments(messages)
        except TemplateError as error:
            raise RecordProblem(Problem.BAD_CONVERSATION, str(error)) from None
        text = "".join(s.text for s in segments)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        ends = np.cumsum([len(s.text) for s in segments])
        first = np.searchsorted(ends, offsets[:, 0], side="right")
        last = np.searchsorted(ends, np.maximum(offsets[:, 1] - 1, offsets[:, 0]), side="right")
        if (first != last).any():
            raise RecordProblem(Problem.BAD_CONVERSATION, "a token spans two template segments")
        if self.config.label_mode == "upstream":
            trained = np.array([s.role == "assistant" for s in segments])[first] | np.isin(ids, self.unmasked_ids)
        else:
            trained = np.array([s.supervised for s in segments])[first]
        labels = np.where(trained & (ids != self.image_token_id), ids, IGNORE_INDEX)
        try:
            ids, labels, spans = expand_image_tokens(ids, self.image_token_id, counts, labels)
        except ValueError as error:
            raise RecordProblem(Problem.IMAGE_COUNT_MISMATCH, str(error)) from None
        return self.truncate(_Tokens(ids, labels, spans, False))

    def truncate(self, tokens: _Tokens) -> _Tokens:
        limit = self.config.max_length
        if len(tokens.ids) > limit:
            for start, count in tokens.spans:
                if start < limit < start + count:
                    raise RecordProblem(Problem.TRUNCATION_CUTS_IMAGE,
                                        f"max_length {limit} falls inside an image block [{start}, {start + count})")
            spans = [(s, c) for s, c in tokens.spans if s + c <= limit]
            tokens = _Tokens(tokens.ids[:limit], tokens.labels[:limit], spans, True)
        if not (tokens.labels[1:] != IGNORE_INDEX).any():
            where = f" after truncation to {limit} tokens" if tokens.truncated else ""
            raise RecordProblem(Problem.NO_SUPERVISED_TOKENS, f"no supervised tokens{where}")
        return tokens

    # ---- entry points
    def build(self, source: SourceRecord) -> Sample:
        record_id, messages, refs = self.parse(source)
        mode = self.image_mode(len(refs))
        images = [self.load_image(ref, source.image_folder) for ref in refs]
        tokens = self.tokenize(messages, [self.visual_tokens(image.size, mode) for image in images])
        mode_settings = pixels.ImageModeSettings(mode, self.settings.merge_type, list(self.settings.pinpoints))
        inputs = []
        for image, (_, count) in zip(images, tokens.spans):
            item = ImageInput(pixels.process_image(image, self.settings.processor, mode_settings), image.size, mode)
            if expected_tokens(item, self.settings) != count:
                raise RuntimeError(f"record {record_id!r}: visual-token count disagrees with the model's merge")
            inputs.append(item)
        return Sample(record_id, torch.from_numpy(tokens.ids), torch.from_numpy(tokens.labels), inputs,
                      tokens.spans, tokens.truncated)

    def measure(self, source: SourceRecord, *, decode_images: bool = False) -> SampleStats:
        record_id, messages, refs = self.parse(source)
        mode = self.image_mode(len(refs))
        if decode_images:
            sizes = [self.load_image(ref, source.image_folder).size for ref in refs]
        else:
            sizes = [self.image_size(ref, source.image_folder) for ref in refs]
        tokens = self.tokenize(messages, [self.visual_tokens(size, mode) for size in sizes])
        visual = [count for _, count in tokens.spans]
        return SampleStats(record_id, len(tokens.ids), len(tokens.ids) - sum(visual), visual,
                           int((tokens.labels[1:] != IGNORE_INDEX).sum()), tokens.truncated,
                           record_fingerprint(source.record))


def _digest_of(value) -> str:
    """JSON stand-in for what JSON cannot hold (image bytes, decoded images), for fingerprints."""
    if isinstance(value, (bytes, bytearray)):
        return hashlib.blake2b(bytes(value), digest_size=16).hexdigest()
    if isinstance(value, Image.Image):
        return f"{value.mode}{value.size}" + hashlib.blake2b(value.tobytes(), digest_size=16).hexdigest()
    return repr(value)


def record_fingerprint(record) -> int:
    """A 64-bit hash of a whole record (its id, turns and images) as a signed int: equal records, equal numbers."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=_digest_of)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def record_id_of(source: SourceRecord) -> str:
    record = source.record
    return str(record["id"]) if isinstance(record, dict) and record.get("id") is not None else source.origin


def collapse_image_tokens(ids: torch.Tensor, labels: torch.Tensor, spans: list[tuple[int, int]],
                          placeholder: int = -200) -> tuple[list[int], list[int]]:
    """Upstream's form of a sample: each image block replaced by one `placeholder` id (-200), label -100."""
    out_ids, out_labels, cursor = [], [], 0
    for start, count in spans:
        out_ids += ids[cursor:start].tolist() + [placeholder]
        out_labels += labels[cursor:start].tolist() + [IGNORE_INDEX]
        cursor = start + count
    return out_ids + ids[cursor:].tolist(), out_labels + labels[cursor:].tolist()

