"""Label builder (mlcd_vl.data.samples) against hand-written expectations, and exact visual-token expansion.

* plain, chatml single-turn, multi-turn, multi-image, text-only, system-prompt records: the decoded supervised runs
  and the rendered text are spelled out by hand;
* `label_mode="upstream"` on the tiny tokenizer (its newline id is not 198): header, newlines and ChatML markers;
* every `<image>` expands to exactly the number of features the model produces (embed_inputs runs, and
  encode_images' block sizes equal the spans) for many image sizes in anyres, anyres_max_N and square modes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_data_common import collapsed_text, record, supervised_runs, tiny_settings, tiny_tokenizer, tiny_vlm

from mlcd_vl.data.config import DataConfig
from mlcd_vl.data.samples import SampleBuilder
from mlcd_vl.data.sources import SourceRecord
from mlcd_vl.model import multimodal
from mlcd_vl.model.build import load_tokenizer

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


def build(tokenizer, data: dict, image_mode="anyres", template="qwen_1_5", **config):
    settings = tiny_settings(image_mode, template)
    builder = SampleBuilder(tokenizer, settings, DataConfig(**config))
    return builder.build(SourceRecord(data, None, "test#0")), builder


def image(size=(70, 40), colour=(200, 30, 30)):
    return Image.new("RGB", size, colour)


def test_chatml_single_turn(tokenizer):
    sample, builder = build(tokenizer, record("a", "<image>\nWhat colour?", "Red and blue.", image=image()))
    assert collapsed_text(sample, tokenizer) == (
        SYSTEM + "<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\nRed and blue.<|im_end|>\n")
    assert supervised_runs(sample, tokenizer) == ["Red and blue.<|im_end|>"]
    (start, count), = sample.image_spans
    assert (sample.input_ids[start:start + count] == builder.image_token_id).all()
    assert (sample.labels[start:start + count] == -100).all()
    assert int((sample.input_ids == builder.image_token_id).sum()) == count
    assert count == multimodal.expected_tokens(sample.images[0], builder.settings)


def test_multi_turn_and_image_moved_to_front(tokenizer):
    data = record("b", "Look at this.\n<image>", "It has two colours.", "Any green?", "No.", image=image())
    sample, _ = build(tokenizer, data)
    assert collapsed_text(sample, tokenizer) == (
        SYSTEM + "<|im_start|>user\n<image>\nLook at this.<|im_end|>\n<|im_start|>assistant\nIt has two colours."
        "<|im_end|>\n<|im_start|>user\nAny green?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n")
    assert supervised_runs(sample, tokenizer) == ["It has two colours.<|im_end|>", "No.<|im_end|>"]
    kept, _ = build(tokenizer, data, image_to_front=False)
    assert "Look at this.\n<image>" in collapsed_text(kept, tokenizer)


def test_multi_image_uses_pad_and_keeps_text(tokenizer):
    data = record("c", "Image A: <image>\nImage B: <image>\nWhich?", "Both red.",
                  image=[image((90, 150)), image((200, 40), (0, 0, 255))])
    sample, builder = build(tokenizer, data)
    assert [i.mode for i in sample.images] == ["pad", "pad"]
    assert [c for _, c in sample.image_spans] == [17, 17]  # 4x4 patches + one image_newline each
    assert collapsed_text(sample, tokenizer).endswith(
        "<|im_start|>user\nImage A: <image>\nImage B: <image>\nWhich?<|im_end|>\n<|im_start|>assistant\nBoth red."
        "<|im_end|>\n")
    assert supervised_runs(sample, tokenizer) == ["Both red.<|im_end|>"]
    same_mode, _ = build(tokenizer, data, multi_image_mode="model")
    assert [i.mode for i in same_mode.images] == ["anyres", "anyres"]
    assert tuple(sample.images[0].pixels.shape) == (3, 56, 56)


def test_text_only_and_system_prompt(tokenizer):
    sample, _ = build(tokenizer, record("d", "Which colours are warm?", "Red and orange."))
    assert sample.images == [] and sample.image_spans == [] and sample.modality == "text"
    assert supervised_runs(sample, tokenizer) == ["Red and orange.<|im_end|>"]
    data = {"id": "e", "conversations": [{"from": "system", "value": "Be brief."},
                                         {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]}
    sample, _ = build(tokenizer, data)
    assert collapsed_text(sample, tokenizer).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")


def test_plain_template(tokenizer):
    data = record("f", "Write a short caption.\n<image>", "A red box.", image=image())
    sample, builder = build(tokenizer, data, image_mode="square", template="plain")
    caption = tokenizer("A red box.\n", add_special_tokens=False)["input_ids"]
    count = 16  # square + flat: one crop of 4x4 patches
    assert sample.input_ids.tolist() == [builder.image_token_id] * count + caption
    assert sample.labels.tolist() == [-100] * count + caption
    assert tokenizer.eos_token_id not in sample.input_ids.tolist()


def _tokenizer_with_newline_moved(folder, tmp_path):
    """The tiny tokenizer with the ids of "\n" (198) and "!" (0) swapped: upstream's hard-coded 198 would be wrong."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    newline, bang = "\u010a", "!"
    vocab[newline], vocab[bang] = vocab[bang], vocab[newline]
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens")) or name == "added_tokens.json":
            shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return load_tokenizer(str(tmp_path))


def test_upstream_label_mode_newline_id_from_tokenizer(tokenizer, tmp_path):
    tokenizer = _tokenizer_with_newline_moved(Path(tokenizer.name_or_path), tmp_path)
    assert tokenizer("\n", add_special_tokens=False)["input_ids"] == [0]
    data = record("g", "<image>\nWhat colour?", "Red and blue.", image=image())
    sample, _ = build(tokenizer, data, label_mode="upstream")
    assert supervised_runs(sample, tokenizer) == [
        "<|im_start|>", "\n", "<|im_end|>\n<|im_start|>", "\n", "\n",
        "<|im_end|>\n<|im_start|>assistant\nRed and blue.<|im_end|>\n"]
    default, _ = build(tokenizer, data)
    assert torch.equal(sample.input_ids, default.input_ids)


IMAGE_SIZES = [(1, 1), (56, 56), (57, 113), (70, 40), (123, 77), (200, 40), (45, 300), (400, 260), (33, 1000),
               (640, 480), (1000, 17)]


@pytest.mark.parametrize("image_mode", ["anyres", "anyres_max_4", "square"])
def test_visual_token_expansion_matches_model(tmp_path_factory, image_mode):
    model, tokenizer, settings = tiny_vlm(tmp_path_factory.mktemp("vlm"), image_mode)
    builder = SampleBuilder(tokenizer, settings, DataConfig())
    cases = [record(f"s{i}", "<image>\nDescribe.", "A box.", image=image(size)) for i, size in enumerate(IMAGE_SIZES)]
    cases.append(record("multi", "<image> and <image>?", "Two.", image=[image((90, 150)), image((300, 20))]))
    with torch.no_grad():
        for data in cases:
            sample = builder.build(SourceRecord(data, None, data["id"]))
            blocks = multimodal.encode_images(model, settings, sample.images)
            assert [b.shape[0] for b in blocks] == [c for _, c in sample.image_spans], data["id"]
            embeds = multimodal.embed_inputs(model, settings, sample.input_ids[None], sample.images)
            assert embeds.shape[1] == sample.length
            stats = builder.measure(SourceRecord(data, None, data["id"]))
            assert stats.length == sample.length and stats.visual_tokens == [c for _, c in sample.image_spans]
