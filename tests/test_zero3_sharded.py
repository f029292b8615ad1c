"""ZeRO-3 without whole-model copies: the partitioned build (`model.sharded`) and the streamed final save
(`train.zero.save_streamed`).

One launch of `tests/zero3_probe.py` on two CPU processes (gloo) serves the DeepSpeed tests: a partitioned build equals
the whole-model build tensor for tensor, bit for bit, with every parameter partitioned (each rank holds half); so does
a growing vocabulary with a full CLIP folder as the tower, and a partitioned `model.checkpoint` load; and the streamed
save writes the very bytes of the save it replaces (DeepSpeed's `zero_to_fp32` over a sharded checkpoint, then
`save_pretrained`), LoRA merged or not, and loads with plain transformers when split in shards with an index.
(The recipe-level equivalence, losses and weights against one process, is tests/test_train_deepspeed.py's and
tests/test_train_lora_zero3.py's, whose ZeRO-3 runs take these paths by default.)

The key maps and the tensor-by-tensor loader also work on a plain model, so the rest runs in this process.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import train_helpers as H

from mlcd_vl.model import sharded
from mlcd_vl.model.build import VLMSpec, build_vlm, composite_key, plan_vlm
from mlcd_vl.train import lora

BUILDS = ("fresh", "resized", "checkpoint")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero3-probe")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(H.REPO / "tests" / "zero3_probe.py"), str(out)]
    H.launch(command, H.env_for({"tiny": str(out / "assets" / "tiny")}), H.FIRST_LAUNCH_TIMEOUT)
    return json.loads((out / "probe.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("build", BUILDS)
def test_partitioned_build_equals_the_whole_model_build(probe, build):
    report = probe[build]
    assert report["names_equal"] and report["differ"] == [], report
    assert report["config_equal"] and report["generation_equal"]
    assert report["unpartitioned"] == []  # no whole parameter is left on any rank
    assert report["local_fraction"] == pytest.approx(report["expected_fraction"])  # each rank its half
    if build != "checkpoint":  # same draws from the generator in the same order
        assert report["generator_equal"]
    if build == "resized":  # the LLM had no row for <image>: the embeddings grew by one
        assert report["vocab"] == report["image_token_id"] + 1


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("save", ["save", "save_lora"])
def test_streamed_save_writes_the_bytes_of_todays_save(probe, save):
    report = probe[save]
    assert report["files"] == ["model.safetensors"]
    assert report["bytes_equal"] and report["keys_equal"] and report["differ"] == []
    assert report["config_equal"] and report["loaded_equal"]
    assert report["no_adapter_keys"]  # LoRA merged into the plain model's weights


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_streamed_save_in_shards_loads_with_plain_transformers(probe):
    report = probe["save_shards"]
    shards = [name for name in report["files"] if name.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in report["files"]
    assert report["keys_equal"] and report["differ"] == [] and report["loaded_equal"]


# ---- in this process: the key maps and the loader on plain (unpartitioned) models


@pytest.fixture(scope="module")
def full_clip_tower(tmp_path_factory):
    """A full CLIP model folder: its file stores `vision_model.*` (and a text model the VLM does not use)."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("full-clip")
    torch.manual_seed(3)
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, vocab_size=100),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=56, patch_size=14),
                         projection_dim=16)).save_pretrained(folder)
    return folder


def plain_composite_from_files(spec: VLMSpec):
    """The partitioned build's steps on a plain model: the composite from its config, the parts' files read tensor
    by tensor through transformers' renaming and `composite_key`."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    plan = plan_vlm(spec)
    sources = {}
    for part, path, model_class, config in (("llm", plan.llm_path, AutoModelForCausalLM, plan.llm_config),
                                            ("tower", plan.tower_path, AutoModel, plan.tower_config)):
        found = sharded.source_keys(sharded.weight_files(path), sharded._meta_model(model_class, config))
        sources.update({composite_key(part, name): where for name, where in found.items()})
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(plan.composite_config(), dtype=torch.float32)
    return model, sharded.load_partitioned(model, sources)


@pytest.mark.parametrize("tower", ["tiny", "full_clip"])
def test_files_read_tensor_by_tensor_fill_the_composite_as_the_whole_build(tiny_assets, full_clip_tower, tower):
    spec = VLMSpec(llm=str(tiny_assets["llm"]), tower=str(tiny_assets["tower"] if tower == "tiny" else full_clip_tower),
                   image_mode="square", merge_type="flat")
    model, missing = plain_composite_from_files(spec)
    assert missing and all(name.startswith("model.multi_modal_projector.") for name in missing)
    expected = build_vlm(spec)[0].state_dict()
    for name, tensor in model.state_dict().items():
        if name not in missing:
            assert torch.equal(tensor, expected[name]), name


def test_a_folder_without_safetensors_is_refused_by_name(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="model.sharded_init=false"):
        sharded.weight_files(tmp_path)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_file({"0.weight": torch.zeros(2, 4), "0.bias": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    sources = {name: (tmp_path / "model.safetensors", name) for name in ("0.weight", "0.bias")}
    with pytest.raises(ValueError, match=r"0\.weight has shape \[2, 4\], the model's 0\.weight needs \[2, 3\]"):
        sharded.load_partitioned(model, sources)


def test_merged_layout_puts_each_adapter_with_its_base_weight():
    names = ["a.weight", "q.base_layer.weight", "q.base_layer.bias", "q.lora_A.default.weight",
             "q.lora_B.default.weight", "b.bias"]
    assert lora.merged_layout(names, {"q": 2.0}) == [
        ("a.weight", ["a.weight"]),
        ("q.weight", ["q.base_layer.weight", "q.lora_A.default.weight", "q.lora_B.default.weight"]),
        ("q.bias", ["q.base_layer.bias"]), ("b.bias", ["b.bias"])]
    with pytest.raises(ValueError, match="no merged layer"):
        lora.merged_layout(names + ["k.lora_A.default.weight"], {"q": 2.0})
    with pytest.raises(ValueError, match="no adapter scaling"):
        lora.merged_layout(names, {})


def test_a_missing_source_is_one_line_not_a_hub_lookup(tmp_path, monkeypatch):
    """weight_files follows the one path rule (model/sources.py): a path that does not exist is named at once, and a
    hub id that cannot be had is a one-line UserError instead of huggingface_hub's traceback."""
    from mlcd_vl.errors import UsageError, UserError
    from mlcd_vl.model import sources

    with pytest.raises(UsageError, match="no such folder: .*nowhere"):
        sharded.weight_files(tmp_path / "nowhere")
    monkeypatch.setattr(sources, "hub_offline", lambda: True)
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        sharded.weight_files("someone/not-a-cached-model")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert sharded.weight_files(tmp_path) == [tmp_path / "model.safetensors"]
