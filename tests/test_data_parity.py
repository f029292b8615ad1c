"""The data pipeline against upstream's own preprocessing (shared/upstream-vectors), read through the manifest.

For every model group and sample in the manifest, our dataset item (records from the vectors' data files, images
from its image folder, settings from the model's entry and tower config) must give:

* with `label_mode="upstream"`: upstream's `input_ids` and `labels` exactly, once each run of our expanded image
  tokens is collapsed to upstream's single -200;
* with the default labels: the same ids (only labels differ);
* the manifest's visual-token count per image, and (with `upstream_image_convert`) pixel tensors whose float32
  SHA-256 equals the manifest's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from mlcd_vl.data.dataset import SupervisedDataset
from mlcd_vl.data.config import DataConfig
from mlcd_vl.data.samples import collapse_image_tokens
from mlcd_vl.data.sources import ConcatRecords, open_file
from mlcd_vl.model.build import VLMSettings, prepare_tokenizer


def _cases(manifest: dict) -> list[tuple[str, str]]:
    return [(group, sample) for group, entry in manifest["models"].items() for sample in entry["samples"]]


def _sha(tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(tensor.numpy(), dtype="<f4").tobytes()).hexdigest()


def _dataset(vectors_dir: Path, manifest: dict, group: str, template: str, label_mode: str) -> SupervisedDataset:
    entry = manifest["models"][group]
    tower = json.loads((vectors_dir / entry["mm_vision_tower"] / "config.json").read_text())
    settings = VLMSettings(image_mode=entry["image_aspect_ratio"], merge_type=entry["mm_patch_merge_type"],
                           pinpoints=entry.get("image_grid_pinpoints") or [], template=template,
                           crop_size=tower["image_size"], patch_size=tower["patch_size"])
    tokenizer_dir = vectors_dir / manifest["tokenizer"]["path"].split()[0]
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), template)
    data_files = [vectors_dir / name.split()[0] for name in manifest["samples_definition"]["data_files"]]
    records = ConcatRecords([open_file(str(path), str(vectors_dir / "images")) for path in data_files])
    config = DataConfig(label_mode=label_mode, upstream_image_convert=True, max_length=1 << 20)
    return SupervisedDataset(records, tokenizer, settings, config)


def _index_of(dataset: SupervisedDataset, sample_id: str) -> int:
    ids = [dataset.records[i].record.get("id") for i in range(len(dataset))]
    return ids.index(sample_id)


def _built(vectors_dir, manifest, label_mode: str):
    """Every manifest sample built by our data pipeline: (group, sample id, facts, sample, upstream-form ids and
    labels)."""
    for group, sample_id in _cases(manifest):
        facts = manifest["models"][group]["samples"][sample_id]
        dataset = _dataset(vectors_dir, manifest, group, facts["template"], label_mode)
        sample = dataset[_index_of(dataset, sample_id)]
        yield (group, sample_id, facts, sample,
               *collapse_image_tokens(sample.input_ids, sample.labels, sample.image_spans))


@pytest.fixture(scope="module")
def vectors(vectors_dir, manifest):
    return {group: load_file(vectors_dir / entry["tensor_file"]) for group, entry in manifest["models"].items()}


def test_every_manifest_sample_is_covered(manifest):
    assert len(_cases(manifest)) >= 5


def test_upstream_labels_and_pixels(vectors_dir, manifest, vectors):
    checked = 0
    for group, sample_id, facts, sample, ids, labels in _built(vectors_dir, manifest, "upstream"):
        assert ids == vectors[group][f"{sample_id}/input_ids"].tolist(), (group, sample_id)
        assert labels == vectors[group][f"{sample_id}/labels"].tolist(), (group, sample_id)
        assert [count for _, count in sample.image_spans] == facts["visual_tokens_per_image"], (group, sample_id)
        image_pixels = [p for p in facts["pixels"] if p.get("pixel_key")]
        assert len(image_pixels) == len(sample.images)
        for expected, image in zip(image_pixels, sample.images):
            stored = manifest["pixel_values"][expected["pixel_key"]]
            assert list(image.pixels.shape) == stored["shape"], (group, sample_id)
            assert _sha(image.pixels) == stored["sha256_f32le"], (group, sample_id, expected["pixel_key"])
            assert list(image.size) == expected["image_size_wh"]
        checked += 1
    assert checked == len(_cases(manifest))


def test_default_labels_keep_upstream_ids(vectors_dir, manifest, vectors):
    for group, sample_id, _, _, ids, labels in _built(vectors_dir, manifest, "default"):
        assert ids == vectors[group][f"{sample_id}/input_ids"].tolist(), (group, sample_id)
        upstream = vectors[group][f"{sample_id}/labels"].tolist()
        # default supervision is a subset of upstream's (no headers, no user/system newlines or markers)
        assert all(ours == -100 or ours == theirs for ours, theirs in zip(labels, upstream))
        assert sum(label != -100 for label in labels) > 0
