"""Batching: padding collator, upstream length/modality grouping, first-fit-decreasing packing, sharding, resume,
DataLoader workers, and packed forwards equal to unpacked ones (tiny VLM, float32, SDPA and eager)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_data_common import record, tiny_settings, tiny_tokenizer, tiny_vlm, write_image

from mlcd_vl.data.collate import PaddingCollator
from mlcd_vl.data.dataset import SupervisedDataset, scan
from mlcd_vl.data.packing import PackingCollator, block_causal_mask, first_fit_decreasing, model_kwargs
from mlcd_vl.model.varlen import VARLEN_ATTENTION, composite_attention
from mlcd_vl.data.samplers import LengthGroupedBatchSampler, PackedBatchSampler
from mlcd_vl.data.config import DataConfig
from mlcd_vl.data.sources import JsonRecords
from mlcd_vl.model.multimodal import embed_inputs
from mlcd_vl.model.pixels import dummy_pixels
from mlcd_vl.train.loss import count_supervised


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Mixed records: one or two images of several sizes, text-only, multi-turn; key `image` as in LLaVA data."""
    root = tmp_path_factory.mktemp("batching")
    sizes = [(40, 30), (120, 60), (56, 200), (300, 300)]
    for i, size in enumerate(sizes):
        write_image(root / f"{i}.png", size, seed=i)
    rows = []
    for i in range(24):
        answer = "It is " + "red and blue " * (i % 5) + "."
        if i % 4 == 3:
            rows.append(record(f"t{i}", "Tell me about colours " * (1 + i % 3), answer))
        elif i % 6 == 1:
            rows.append(record(f"m{i}", "<image> vs <image>?", answer, image=[f"{i % 4}.png", f"{(i + 1) % 4}.png"]))
        else:
            rows.append(record(f"i{i}", "<image>\nWhat?", answer, "More?", "No.", image=f"{i % 4}.png"))
    (root / "data.json").write_text(json.dumps(rows))
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tiny"))
    return SupervisedDataset(JsonRecords(root / "data.json", str(root)), tokenizer, tiny_settings(), DataConfig())


@pytest.fixture(scope="module")
def table(dataset):
    return scan(dataset)


def test_padding_collator(dataset):
    items = [dataset[i] for i in (0, 3, 1)]
    batch = PaddingCollator.for_model(dataset.tokenizer)(items)
    width = max(s.length for s in items)
    assert batch["input_ids"].shape == (3, width)
    for row, sample in enumerate(items):
        assert torch.equal(batch["input_ids"][row, :sample.length], sample.input_ids)
        assert (batch["labels"][row, sample.length:] == -100).all()
        assert batch["attention_mask"][row].sum() == sample.length
    assert batch["images"] == [image for s in items for image in s.images]  # prompt order
    text_only = PaddingCollator.for_model(dataset.tokenizer)([dataset[3]])
    # a text-only batch carries no stand-in crop: the training forward runs this one through the tower itself
    assert text_only["images"] == [] and dummy_pixels(dataset.settings.processor).shape == (1, 3, 56, 56)


def test_first_fit_decreasing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 500)
    bins = first_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(lengths[b].sum() <= 512 for b in bins)
    assert first_fit_decreasing([5, 3, 7, 2, 9, 1, 4], 10) == [[4, 5], [2, 1], [0, 6], [3]]
    assert first_fit_decreasing([20, 3], 10) == [[1], [0]]  # too long: a row of its own, last


def test_length_grouped_sampler_modality_and_sharding(table):
    assert table.has_image.sum() > 0 and (~table.has_image).sum() > 0  # `image` key counts as an image record
    world, batch, accum = 2, 2, 1
    samplers = [LengthGroupedBatchSampler(table.lengths, table.has_image, batch, world_size=world, rank=r, seed=3)
                for r in range(world)]
    shares = [list(s) for s in samplers]
    assert len(shares[0]) == len(shares[1])
    flat = [i for share in shares for b in share for i in b]
    assert set(flat) == set(table.valid.tolist())
    megabatch = world * batch * accum
    order = [i for step in zip(*shares) for b in step for i in b]  # global order, round-robin dealing undone
    groups = [order[i:i + megabatch] for i in range(0, len(order), megabatch)]
    pure = [len({bool(table.has_image[i]) for i in g}) == 1 for g in groups[:-1]]
    assert all(pure) and len(order) == len(table.valid)  # single-modality megabatches; the mixed remainder last
    again = [list(LengthGroupedBatchSampler(table.lengths, table.has_image, batch, world_size=world, rank=r, seed=3))
             for r in range(world)]
    assert again == shares


@pytest.mark.parametrize("kind", ["grouped", "packed"])
def test_sampler_resumes_mid_epoch(table, kind):
    def make(rank=0):
        if kind == "grouped":
            return LengthGroupedBatchSampler(table.lengths, table.has_image, 2, world_size=2, rank=rank, seed=5)
        return PackedBatchSampler(table.lengths, 600, window=8, world_size=2, rank=rank, seed=5)

    sampler = make()
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != full  # a new epoch, a new order
    first = make()
    first.set_epoch(1)
    iterator = iter(first)
    head = [next(iterator) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert make().state_dict(consumed=2)["position"] == 2


def test_packed_sampler_budget_and_shards(table):
    budget = 700
    shares = [list(PackedBatchSampler(table.lengths, budget, window=10, world_size=3, rank=r, seed=1))
              for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    rows = [row for share in shares for row in share]
    assert all(table.lengths[row].sum() <= budget for row in rows)
    assert set(i for row in rows for i in row) == set(table.valid.tolist())


def test_packed_dataloader_with_workers(dataset, table):
    sampler = PackedBatchSampler(table.lengths, 800, seed=0)
    collator = PackingCollator.for_model(dataset.tokenizer, build_4d_mask=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collator)
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape[1] == sum(batch["seq_lengths"]) <= 800
        assert batch["cu_seqlens"][-1] == batch["input_ids"].shape[1]
        seen += batch["record_ids"]
    assert sorted(seen) == sorted(dataset.records[i].record["id"] for i in table.valid)


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN_ATTENTION])
def test_packed_forward_equals_unpacked(tmp_path_factory, dataset, attn):
    model, tokenizer, settings = tiny_vlm(tmp_path_factory.mktemp("vlm"), attn=composite_attention(attn, packing=False))
    assert settings.crop_size == dataset.settings.crop_size and tokenizer.get_vocab() == dataset.tokenizer.get_vocab()
    samples = [dataset[i] for i in (0, 3, 1, 2)]  # image, text-only, two images, image
    batch = PackingCollator.for_model(tokenizer, build_4d_mask=attn != VARLEN_ATTENTION)(samples)
    assert batch["position_ids"][0, samples[0].length] == 0
    with torch.no_grad():
        embeds = embed_inputs(model, settings, batch["input_ids"], batch["images"])
        packed = model(inputs_embeds=embeds, labels=batch["labels"], **model_kwargs(batch, attn))
        summed, start = 0.0, 0
        for sample in samples:
            single = model(inputs_embeds=embed_inputs(model, settings, sample.input_ids[None], sample.images),
                           labels=sample.labels[None])
            torch.testing.assert_close(packed.logits[0, start:start + sample.length], single.logits[0],
                                       atol=1e-4, rtol=0)
            summed += single.loss.item() * int((sample.labels[1:] != -100).sum())
            start += sample.length
        supervised = count_supervised(batch["labels"], batch["position_ids"])
        assert packed.loss.item() * supervised == pytest.approx(summed, rel=1e-5)
        by_positions = model(inputs_embeds=embeds, position_ids=batch["position_ids"]).logits  # no mask, no bounds
        if attn == VARLEN_ATTENTION:  # restarting position ids alone isolate samples, as with flash-attention
            torch.testing.assert_close(by_positions, packed.logits, atol=1e-5, rtol=0)
        else:  # plain SDPA and eager leak across samples without the block mask
            assert (by_positions[0, samples[0].length:] - packed.logits[0, samples[0].length:]).abs().max() > 1e-3


def test_block_causal_mask_shape():
    mask = block_causal_mask([2, 3])
    allowed = mask[0, 0] == 0
    assert allowed.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                                [False, False, True, False, False], [False, False, True, True, False],
                                [False, False, True, True, True]]
