"""The generation engine on tiny random models: batching, caching, stop strings, settings, streaming, seeds, and
its decode loop against transformers' own `generate` (the oracle)."""

from __future__ import annotations

import base64
import copy
import io
import re

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import GenerationConfig
from transformers.generation import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from mlcd_vl.model.templates import get_template, normalize_messages
from mlcd_vl.assets import DEMO_IMAGE
from mlcd_vl.model import multimodal, tiny
from mlcd_vl.model.build import build_vlm
from mlcd_vl.model.checkpoint import save_vlm
from mlcd_vl.serve.engine import Engine
from mlcd_vl.serve.requests import EngineError, GenerationSettings, Request

MODES = {"anyres": ("anyres", "spatial_unpad"), "square": ("square", "flat"),
         "anyres_max_4": ("anyres_max_4", "spatial_unpad")}


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def _engine(assets, mode: str) -> Engine:
    model, tokenizer, settings = build_vlm(tiny.tiny_spec(assets, *MODES[mode]))
    return Engine(model, tokenizer, settings)


@pytest.fixture(scope="module")
def engine(assets) -> Engine:
    return _engine(assets, "anyres")


def picture(width: int, height: int, colour: str) -> Image.Image:
    image = Image.new("RGB", (width, height), colour)
    ImageDraw.Draw(image).ellipse((width // 6, height // 6, width // 2, height // 2), fill=(20, 40, 220))
    return image


def requests() -> list[Request]:
    """Different prompt lengths, image counts and image sizes (one text-only request among them)."""
    return [
        Request([{"role": "user", "content": "<image>\nWhat colour is the circle?"}], [Image.open(DEMO_IMAGE)]),
        Request([{"role": "user", "content": "How many bars are there in this chart? Write a short answer."}],
                [picture(40, 120, "green"), picture(100, 100, "white")]),
        Request([{"role": "user", "content": "Describe the picture."}]),
        Request([{"role": "user", "content": [{"type": "text", "text": "Which shape is largest?"},
                                              {"type": "image", "image": picture(200, 50, "yellow")}]}]),
    ]


GREEDY = GenerationSettings(max_new_tokens=16)


def transformers_generate(engine: Engine, batch: list[Request], settings: GenerationSettings) -> list:
    """transformers' `model.generate` on the engine's own inputs and rules: the oracle for the engine's decode loop."""
    prompts = [engine.prepare(request) for request in batch]
    config = copy.deepcopy(engine.generation_config(settings))
    _, stop_strings = engine.stop_rules(settings)
    mask, embeds = engine.inputs(prompts)
    extra = dict(tokenizer=engine.tokenizer) if stop_strings else {}  # StopStringCriteria needs it
    if config.repetition_penalty not in (None, 1.0):
        # given only embeddings, transformers' own penalty skips each row's first <left padding> generated tokens
        # (it takes them for prompt); the engine's sees all of them, so the oracle gets the processor that does too
        extra["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(config.repetition_penalty)])
        config.repetition_penalty = 1.0
    saved = engine.model.generation_config  # generate fills unset values from it: hide the checkpoint's defaults
    engine.model.generation_config = GenerationConfig(eos_token_id=saved.eos_token_id, bos_token_id=saved.bos_token_id,
                                                      pad_token_id=engine.pad_token_id)
    try:
        with torch.random.fork_rng(), torch.inference_mode():
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            rows = engine.model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                                         **extra).tolist()
    finally:
        engine.model.generation_config = saved
    return [engine.finish(prompt, row, config, stop_strings) for prompt, row in zip(prompts, rows)]


@pytest.mark.parametrize("settings", [GREEDY, GenerationSettings(max_new_tokens=16, repetition_penalty=1.5),
                                      GenerationSettings(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=20,
                                                         seed=7)], ids=["greedy", "penalty", "seeded-sampling"])
def test_decode_loop_equals_transformers_generate(engine, settings):
    batch = requests() if settings.seed is None else requests()[:1]  # sampling: one row draws like generate's
    ours = engine.generate(batch, settings)
    oracle = transformers_generate(engine, batch, settings)
    assert [r.token_ids for r in ours] == [r.token_ids for r in oracle]
    assert [(r.text, r.finish_reason, r.completion_tokens) for r in ours] == \
           [(r.text, r.finish_reason, r.completion_tokens) for r in oracle]


@pytest.mark.parametrize("mode", ["anyres", "square"])
def test_batch_equals_single_greedy(assets, mode):
    engine = _engine(assets, mode)
    batch = engine.generate(requests(), GREEDY)
    singles = [engine.generate([request], GREEDY)[0] for request in requests()]
    assert len({len(engine.prepare(r).input_ids) for r in requests()}) == len(requests())  # padding really happens
    for together, alone in zip(batch, singles):
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
        assert (together.prompt_tokens, together.completion_tokens) == (alone.prompt_tokens, alone.completion_tokens)


def test_kv_cache_and_no_cache_agree(engine):
    cached = engine.generate(requests(), GREEDY)
    uncached = engine.generate(requests(), GenerationSettings(max_new_tokens=16, use_cache=False))
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]
    assert all(r.completion_tokens == 16 or r.finish_reason == "stop" for r in cached)
    stream = engine.stream(requests()[0], GenerationSettings(max_new_tokens=16, use_cache=False))
    assert stream.text() == cached[0].text


def test_onevision_batch_and_cache(assets):
    engine = _engine(assets, "anyres_max_4")
    batch = engine.generate(requests(), GenerationSettings(max_new_tokens=8))
    uncached = engine.generate(requests()[:1], GenerationSettings(max_new_tokens=8, use_cache=False))
    assert batch[0].token_ids == uncached[0].token_ids == engine.generate(requests()[:1], GREEDY)[0].token_ids[:8]


def test_prompt_uses_the_checkpoint_template_and_exact_visual_tokens(engine):
    request = requests()[1]
    prompt = engine.prepare(request)
    expected_text = get_template("qwen_1_5").render(
        normalize_messages([{"role": "user", "content": "<image>\n<image>\n" + request.messages[0]["content"]}]),
        add_generation_prompt=True)
    assert prompt.text == expected_text
    assert prompt.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert prompt.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    visual = sum(1 for token in prompt.input_ids if token == engine.image_token_id)
    assert visual == sum(multimodal.expected_tokens(image, engine.settings) for image in prompt.images)
    assert all(image.mode == engine.settings.image_mode for image in prompt.images)  # each image in the model's mode


def test_image_forms_are_equivalent(engine, tmp_path):
    image = picture(90, 60, "orange")
    path = tmp_path / "p.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    forms = [
        Request([{"role": "user", "content": "<image>\nWhat is it?"}], [image]),
        Request([{"role": "user", "content": "What is it?"}], [str(path)]),  # no placeholder: prepended
        Request([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                              {"type": "text", "text": "What is it?"}]}]),
        Request([{"from": "human", "value": "<image>\nWhat is it?"}], [f"file://{path}"]),
    ]
    prompts = [engine.prepare(form) for form in forms]
    assert all(p.input_ids == prompts[0].input_ids for p in prompts)
    assert all(torch.equal(p.images[0].pixels, prompts[0].images[0].pixels) for p in prompts)


def test_bad_requests_raise_clear_errors(engine):
    with pytest.raises(EngineError, match="1 <image> placeholder"):
        engine.prepare(Request([{"role": "user", "content": "<image>\nhi"}], [picture(20, 20, "red")] * 2))
    with pytest.raises(EngineError, match="remote image URLs"):
        engine.prepare(Request([{"role": "user", "content": "<image>\nhi"}], ["https://example.com/a.png"]))
    with pytest.raises(EngineError, match="unknown role"):
        engine.prepare([{"role": "robot", "content": "hi"}])
    with pytest.raises(EngineError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_stop_strings_cut_text_and_stop_early(engine):
    request = requests()[0]
    base = engine.generate([request], GenerationSettings(max_new_tokens=32))[0]
    match = re.search(r"[A-Za-z]{2}", base.text[1:])
    assert match, base.text
    stop = match.group(0)
    cut = base.text.find(stop)
    result = engine.generate([request], GenerationSettings(max_new_tokens=32, stop=[stop]))[0]
    assert result.text == base.text[:cut]
    assert result.finish_reason == "stop"
    assert result.completion_tokens < base.completion_tokens
    assert result.token_ids == base.token_ids[:result.completion_tokens]
    stream = engine.stream(request, GenerationSettings(max_new_tokens=32, stop=[stop]))
    assert "".join(stream) == result.text
    assert stream.result.completion_tokens == result.completion_tokens
    uncached = engine.generate([request], GenerationSettings(max_new_tokens=32, stop=[stop], use_cache=False))[0]
    assert uncached.text == result.text and uncached.completion_tokens == result.completion_tokens
    # the template's stop string is a special token: it becomes a stop id, never a text match
    stop_ids, strings = engine.stop_rules(GenerationSettings(stop=["<|im_end|>", stop]))
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_ids
    assert strings == [stop]


def test_stop_token_ends_generation(engine):
    request = requests()[0]
    base = engine.generate([request], GenerationSettings(max_new_tokens=12))[0]
    token = base.token_ids[4]
    engine.checkpoint_generation_config = GenerationConfig(eos_token_id=[token])
    try:
        result = engine.generate([request], GenerationSettings(max_new_tokens=12))[0]
    finally:
        engine.checkpoint_generation_config = engine.model.generation_config
    first = base.token_ids.index(token)
    assert result.finish_reason == "stop"
    assert result.completion_tokens == first + 1  # the stop token counts, as in usage reports
    assert result.token_ids == base.token_ids[:first]


def test_repetition_penalty_not_inherited(assets):
    engine = _engine(assets, "anyres")
    clean = engine.generate(requests()[:2], GenerationSettings(max_new_tokens=24))
    # a checkpoint whose generation_config.json carries Qwen-style sampling defaults, exaggerated
    engine.model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=5.0,
        eos_token_id=engine.model.generation_config.eos_token_id, pad_token_id=engine.pad_token_id)
    engine = Engine(engine.model, engine.tokenizer, engine.settings)
    config = engine.generation_config(GenerationSettings())
    assert config.repetition_penalty == 1.0 and config.do_sample is False
    polluted = engine.generate(requests()[:2], GenerationSettings(max_new_tokens=24))
    assert [r.token_ids for r in polluted] == [r.token_ids for r in clean]
    assert engine.model.generation_config.repetition_penalty == 5.0  # restored after the call
    # asked for explicitly: the checkpoint's value is used
    assert engine.generation_config(GenerationSettings(repetition_penalty=None)).repetition_penalty == 5.0
    asked = engine.generate(requests()[:2], GenerationSettings(max_new_tokens=24, repetition_penalty=None))
    assert [r.token_ids for r in asked] != [r.token_ids for r in clean]
    assert all(len(set(a.token_ids)) >= len(set(c.token_ids)) for a, c in zip(asked, clean))  # fewer repeats


def test_stream_yields_the_same_text(engine):
    for request in requests()[:3]:
        result = engine.generate([request], GenerationSettings(max_new_tokens=20))[0]
        stream = engine.stream(request, GenerationSettings(max_new_tokens=20))
        pieces = list(stream)
        assert "".join(pieces) == result.text
        assert len(pieces) > 1
        assert stream.result.token_ids == result.token_ids
        assert stream.result.completion_tokens == result.completion_tokens
        assert stream.result.prompt_tokens == result.prompt_tokens


@pytest.mark.parametrize("extra", [{}, {"top_p": 0.9, "top_k": 20}, {"repetition_penalty": 1.3}])
def test_sampling_is_reproducible_with_a_seed(engine, extra):
    request = requests()[0]
    settings = GenerationSettings(max_new_tokens=24, temperature=1.0, seed=7, **extra)
    first = engine.generate([request], settings)[0]
    second = engine.generate([request], settings)[0]
    other = engine.generate([request], GenerationSettings(max_new_tokens=24, temperature=1.0, seed=8, **extra))[0]
    assert first.token_ids == second.token_ids
    assert other.token_ids != first.token_ids
    streamed = engine.stream(request, settings)
    assert streamed.text() == first.text  # our decode loop samples exactly like model.generate
    state = torch.random.get_rng_state()
    engine.generate([request], settings)
    assert torch.equal(state, torch.random.get_rng_state())  # the seed does not touch the global RNG


def test_from_pretrained_and_usage(assets, tmp_path):
    source = _engine(assets, "anyres")
    folder = save_vlm(source.model, source.tokenizer, source.settings, tmp_path / "vlm")
    engine = Engine.from_pretrained(folder)
    assert engine.model.dtype == torch.float32 and engine.device.type == "cpu"
    request = requests()[1]
    result = engine.chat(request.messages, request.images, GenerationSettings(max_new_tokens=10))
    assert result.prompt_tokens == len(engine.prepare(request).input_ids)
    assert result.total_tokens == result.prompt_tokens + result.completion_tokens
    assert result.token_ids == source.generate([request], GenerationSettings(max_new_tokens=10))[0].token_ids


def test_repetition_penalty_is_batch_independent(engine):
    # transformers' own penalty, fed only embeddings, skips each row's first `left padding` generated tokens;
    # the engine applies its own processor so batch 1 and batch N agree
    settings = GenerationSettings(max_new_tokens=16, repetition_penalty=1.5)
    batch = engine.generate(requests(), settings)
    singles = [engine.generate([request], settings)[0] for request in requests()]
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]
    uncached = engine.generate(requests(), GenerationSettings(max_new_tokens=16, repetition_penalty=1.5,
                                                              use_cache=False))
    assert [r.token_ids for r in uncached] == [r.token_ids for r in batch]
