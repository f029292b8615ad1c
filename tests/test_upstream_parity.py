"""Parity with upstream mlcd_vl on the reference vectors, through `mlcd-vl convert` and our own merge.

Every upstream checkpoint of the manifest is converted to an HF-native folder and loaded with `load_vlm`; each
sample is rebuilt from the stored upstream ids (-200 placeholders expanded to the image's token count) and our own
pixels, then logits, inputs_embeds, vision / projected features and the loss are compared with what upstream stored
(full tensors or column sketches, whichever the file holds). Also: the right-padded batch, greedy generation,
stage-1 artefacts, and transformers' own processor + forward on the converted folders. File names, sample ids,
columns and settings all come from manifest.json, so the same tests run on the held-out set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import upstream_utils as U
from mlcd_vl.model import multimodal, pixels

LOGITS_ATOL = 1e-4
FEATURES_ATOL = 1e-4
LOSS_ATOL = 1e-5
BATCH_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("single_thread")


def _columns(vectors: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return vectors["sketch/logit_columns"], vectors["sketch/hidden_columns"], vectors["sketch/vision_columns"]


def _spliced_labels(upstream_labels: torch.Tensor, upstream_ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Upstream labels with each -200 position widened to its image's token count of -100."""
    pieces, start = [], 0
    positions = (upstream_ids == U.UPSTREAM_IMAGE_INDEX).nonzero().flatten().tolist()
    for position, count in zip(positions, counts):
        pieces += [upstream_labels[start:position], torch.full((count,), U.IGNORE_INDEX, dtype=torch.long)]
        start = position + 1
    pieces.append(upstream_labels[start:])
    return torch.cat(pieces)


def _check_pixels(manifest: dict, vectors_dir: Path, sample: dict, images: list) -> None:
    stored = {}
    if (vectors_dir / "pixel_values.safetensors").is_file():
        from safetensors.torch import load_file

        stored = load_file(str(vectors_dir / "pixel_values.safetensors"))
    for entry, image in zip([p for p in sample["pixels"] if p.get("pixel_key")], images):
        key = entry["pixel_key"]
        assert list(image.pixels.shape) == entry["shape"], f"{key}: shape {list(image.pixels.shape)}"
        assert list(image.size) == entry["image_size_wh"], f"{key}: size {image.size}"
        facts = manifest.get("pixel_values", {}).get(key)
        if facts:
            assert U.sha256_f32(image.pixels) == facts["sha256_f32le"], f"{key}: pixels differ from upstream's"
        if key in stored:
            assert torch.equal(image.pixels, stored[key]), f"{key}: pixels differ from the stored tensor"


def _check_sample(model, settings, vectors: dict, vectors_dir: Path, manifest: dict, sample_id: str,
                  sample: dict) -> dict:
    """All comparisons of one sample; returns the max abs diffs (raises on the first failure)."""
    logit_cols, hidden_cols, vision_cols = _columns(vectors)
    images = U.sample_images(vectors_dir, sample, settings)
    _check_pixels(manifest, vectors_dir, sample, images)
    upstream_ids = vectors[f"{sample_id}/input_ids"]
    out = U.run_sample(model, settings, upstream_ids, images)
    where = f"{sample_id}"
    counts = [multimodal.expected_tokens(image, settings) for image in images]
    assert counts == sample["visual_tokens_per_image"], f"{where}: visual tokens {counts}"
    assert sum(counts) == sample["visual_tokens"], where
    assert out.input_ids.shape[0] == sample["inputs_embeds_len"], f"{where}: length {out.input_ids.shape[0]}"
    image_rows = (out.input_ids == model.config.image_token_id).nonzero().flatten().tolist()
    expected_rows = [start + i for start, length in sample["visual_blocks"] for i in range(length)]
    assert image_rows == expected_rows, f"{where}: visual blocks at other positions"
    labels = _spliced_labels(vectors[f"{sample_id}/labels"], upstream_ids, counts)
    assert torch.equal(labels, vectors[f"{sample_id}/spliced_labels"]), f"{where}: spliced labels differ"

    diffs: dict = {}
    U.compare_float(vectors, f"{sample_id}/logits", out.logits, logit_cols, LOGITS_ATOL, diffs)
    U.compare_float(vectors, f"{sample_id}/inputs_embeds", out.inputs_embeds, hidden_cols, FEATURES_ATOL, diffs)
    vision, projected = out.vision_features, out.projected_features
    if not images and (f"{sample_id}/vision_features_cols" in vectors or f"{sample_id}/vision_features" in vectors):
        with torch.no_grad():  # text-only: upstream ran its dummy zero crop through tower and projector
            vision = multimodal.vision_tower_features(model, pixels.dummy_pixels(settings.processor))
            projected = model.model.multi_modal_projector(vision)
    if vision is not None:
        assert vision.shape[0] == sample["n_crops"], f"{where}: {vision.shape[0]} crops"
        U.compare_float(vectors, f"{sample_id}/vision_features", vision, vision_cols, FEATURES_ATOL, diffs)
        U.compare_float(vectors, f"{sample_id}/projected_features", projected, hidden_cols, FEATURES_ATOL, diffs)
    loss = U.causal_lm_loss(out.logits, labels)
    diffs["loss"] = abs(float(loss) - float(vectors[f"{sample_id}/loss"]))
    assert diffs["loss"] <= LOSS_ATOL, f"{where}: loss {float(loss)} vs {float(vectors[f'{sample_id}/loss'])}"
    if not images:  # upstream: the logits equal a plain text forward; so must ours, with or without the dummy crop
        with torch.no_grad():
            plain = model(input_ids=out.input_ids[None]).logits[0]
            embeds = multimodal.embed_inputs(model, settings, out.input_ids[None], [],
                                             dummy_crop=pixels.dummy_pixels(settings.processor))
            dummy = model(inputs_embeds=embeds).logits[0]
        assert torch.equal(plain, out.logits) and torch.equal(dummy, out.logits), f"{where}: text-only differs"
    return diffs


def _report(name: str, all_diffs: dict) -> None:
    worst: dict = {}
    for diffs in all_diffs.values():
        for key, value in diffs.items():
            kind = key.split("/")[-1]
            worst[kind] = max(worst.get(kind, 0.0), value)
    print(f"{name}: max abs diffs over {len(all_diffs)} samples: {worst}")


def test_stage2_samples_match_upstream(vectors_dir, manifest, tmp_root):
    names = U.stage2_models(manifest)
    assert names, "manifest lists no stage-2 models"
    for name in names:
        model, _, settings = U.loaded(U.converted(tmp_root, vectors_dir, manifest, name))
        info = manifest["models"][name]
        assert settings.image_mode == info["image_aspect_ratio"]
        assert settings.merge_type == info["mm_patch_merge_type"]
        if "image_grid_pinpoints" in info:  # upstream (width, height), kept so in our settings
            assert [list(p) for p in settings.pinpoints] == info["image_grid_pinpoints"]
        vectors = U.load_vectors(vectors_dir, manifest, name)
        all_diffs = {}
        for sample_id, sample in info["samples"].items():
            all_diffs[sample_id] = _check_sample(model, settings, vectors, vectors_dir, manifest, sample_id, sample)
        _report(name, all_diffs)


def test_stage1_plain_matches_upstream(vectors_dir, manifest, tmp_root):
    names = U.stage1_models(manifest)
    assert names, "manifest lists no stage-1 artefacts"
    for name in names:
        folder = U.converted(tmp_root, vectors_dir, manifest, name)
        model, _, settings = U.loaded(folder)
        assert model.config.model_type == "llava"
        assert (settings.image_mode, settings.merge_type) == (manifest["models"][name]["image_aspect_ratio"],
                                                              manifest["models"][name]["mm_patch_merge_type"])
        vectors = U.load_vectors(vectors_dir, manifest, name)
        all_diffs = {}
        for sample_id, sample in manifest["models"][name]["samples"].items():
            all_diffs[sample_id] = _check_sample(model, settings, vectors, vectors_dir, manifest, sample_id, sample)
        _report(name, all_diffs)


def test_stage2_padded_batch_matches_upstream(vectors_dir, manifest, tmp_root):
    checked = 0
    for name in U.stage2_models(manifest):
        info = manifest["models"][name]
        batch = info.get("batched")
        vectors = U.load_vectors(vectors_dir, manifest, name)
        if not batch or "batch3/logits_cols" not in vectors:
            continue
        model, _, settings = U.loaded(U.converted(tmp_root, vectors_dir, manifest, name))
        logit_cols = vectors["sketch/logit_columns"]
        rows = []
        for sample_id in batch["samples"]:
            images = U.sample_images(vectors_dir, info["samples"][sample_id], settings)
            ids = U.expand_ids(vectors[f"{sample_id}/input_ids"], images, settings, model.config.image_token_id)
            with torch.no_grad():
                rows.append(multimodal.embed_inputs(model, settings, ids[None], images)[0])
        assert [len(r) for r in rows] == batch["per_sample_spliced_len"]
        length = max(len(r) for r in rows)
        embeds = torch.zeros(len(rows), length, rows[0].shape[-1])  # upstream right-pads with zero embeddings
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            embeds[i, :len(row)], mask[i, :len(row)] = row, 1
        assert torch.equal(mask, vectors["batch3/spliced_attention_mask"].long())
        with torch.no_grad():
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        valid = mask.bool()
        diff = U.max_diff(logits[valid][:, logit_cols], vectors["batch3/logits_cols"][valid])
        assert diff <= BATCH_ATOL, f"{name}: batch logits differ by {diff}"
        last = torch.stack([logits[i, len(r) - 1] for i, r in enumerate(rows)])
        assert U.max_diff(last, vectors["batch3/last_logits"]) <= BATCH_ATOL, name
        labels = vectors["batch3/spliced_labels"]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=U.IGNORE_INDEX)
        assert abs(float(loss) - float(vectors["batch3/loss"])) <= LOSS_ATOL, name
        checked += 1
    assert checked, "no batch3 vectors found"


def _generation_inputs(model, settings, vectors_dir, vectors, key, entry):
    images = U.sample_images(vectors_dir, {"images": [entry["image"]]}, settings)
    ids = U.expand_ids(vectors[f"{key}/prompt_input_ids"], images, settings, model.config.image_token_id)
    with torch.no_grad():
        embeds = multimodal.embed_inputs(model, settings, ids[None], images)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long)


def _greedy(model, embeds, mask, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=8, temperature=None, top_p=None, top_k=None, **kwargs)
    return out[0].tolist()  # generate() with inputs_embeds returns the new tokens only, as upstream


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_greedy_generation_matches_upstream(vectors_dir, manifest, tmp_root):
    from mlcd_vl.model.checkpoint import load_vlm

    checked = 0
    for name in U.stage2_models(manifest):
        info = manifest["models"][name]
        folder = U.converted(tmp_root, vectors_dir, manifest, name)
        model, _, settings = U.loaded(folder)
        vectors = U.load_vectors(vectors_dir, manifest, name)
        ckpt_generation = json.loads((vectors_dir / info["path"] / "generation_config.json").read_text())
        assert model.generation_config.repetition_penalty == ckpt_generation.get("repetition_penalty", 1.0)
        for key, entry in info.get("generation", {}).items():
            embeds, mask = _generation_inputs(model, settings, vectors_dir, vectors, key, entry)
            assert embeds.shape[1] == vectors[f"{key}/prompt_input_ids"].shape[0] - 1 + sum(
                multimodal.expected_tokens(i, settings)
                for i in U.sample_images(vectors_dir, {"images": [entry["image"]]}, settings))
            with torch.no_grad():
                last = model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
            assert U.max_diff(last, vectors[f"{key}/last_logits"]) <= LOGITS_ATOL, f"{name}/{key}: last logits"
            pure = _greedy(model, embeds, mask, repetition_penalty=1.0)
            assert pure == vectors[f"{key}/pure_greedy/new_token_ids"].tolist(), f"{name}/{key}: pure greedy"
            # The checkpoint's own generation config (repetition penalty 1.05 on generated tokens only).
            with_config = _greedy(model, embeds, mask)
            assert with_config == vectors[f"{key}/ckpt_generation_config/new_token_ids"].tolist(), \
                f"{name}/{key}: with the checkpoint generation config"
            checked += 1
        resized_keys = [k for k in info.get("generation", {}) if f"{k}/vocab_resized_to_len_tokenizer/new_token_ids"
                        in vectors]
        if resized_keys:  # upstream's load_pretrained_model shrinks the vocabulary to len(tokenizer)
            from transformers import AutoTokenizer

            fresh, _, _ = load_vlm(folder, dtype=torch.float32)
            fresh.resize_token_embeddings(len(AutoTokenizer.from_pretrained(vectors_dir / info["path"])))
            for key in resized_keys:
                embeds, mask = _generation_inputs(fresh, settings, vectors_dir, vectors, key,
                                                  info["generation"][key])
                got = _greedy(fresh, embeds, mask)
                assert got == vectors[f"{key}/vocab_resized_to_len_tokenizer/new_token_ids"].tolist(), \
                    f"{name}/{key}: vocabulary-resized generation"
    assert checked, "no generation vectors found"


def _hf_processor(folder: Path):
    """transformers' own processor with the PIL image backend (upstream's pixels). OneVision's video processor has
    no PIL backend, so there the image processor is swapped in separately."""
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder, backend="pil")
    except (ImportError, ValueError):
        processor = AutoProcessor.from_pretrained(folder)
        processor.image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        return processor


def test_transformers_processor_and_forward_match_ours(vectors_dir, manifest, tmp_root):
    """Single-image samples through plain transformers (AutoProcessor + AutoModelForImageTextToText, no
    trust_remote_code) give our ids, our pixels and so our logits."""
    from transformers import AutoModelForImageTextToText

    checked = 0
    for name in U.stage2_models(manifest) + U.stage1_models(manifest):
        folder = U.converted(tmp_root, vectors_dir, manifest, name)
        model, _, settings = U.loaded(folder)
        hf_model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(hf_model) is type(model)
        processor = _hf_processor(folder)
        vectors = U.load_vectors(vectors_dir, manifest, name)
        for sample_id, sample in manifest["models"][name]["samples"].items():
            if len(sample["images"]) != 1 or "text" not in sample:
                continue
            image = pixels.load_rgb(vectors_dir / "images" / sample["images"][0], upstream_convert=True)
            ours = U.run_sample(model, settings, vectors[f"{sample_id}/input_ids"],
                                U.sample_images(vectors_dir, sample, settings))
            inputs = processor(text=sample["text"], images=image, return_tensors="pt")
            assert torch.equal(inputs["input_ids"][0], ours.input_ids), f"{name}/{sample_id}: processor ids"
            ours_pixels = U.sample_images(vectors_dir, sample, settings)[0].crops
            theirs = inputs["pixel_values"][0] if inputs["pixel_values"].dim() == 5 else inputs["pixel_values"]
            assert torch.equal(theirs[:ours_pixels.shape[0]], ours_pixels), f"{name}/{sample_id}: pixels"
            with torch.no_grad():
                logits = hf_model(**inputs).logits[0]
            assert U.max_diff(logits, ours.logits) <= LOGITS_ATOL, f"{name}/{sample_id}: transformers' forward"
            checked += 1
    assert checked
