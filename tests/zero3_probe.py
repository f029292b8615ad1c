"""Run under `torchrun --nproc_per_node 2` (CPU, gloo) by tests/test_zero3_sharded.py: ZeRO-3 sharded builds and the
streamed save against the whole-model paths, in one launch. Writes `<out>/probe.json` (rank 0).

Builds (each compared parameter by parameter, bit for bit, gathered one at a time):
* `fresh`: the tiny stage-2 composite (MLCD tower, anyres), `build_vlm_partitioned` vs `build_vlm`;
* `resized`: an LLM whose vocabulary has no room for <image> (the embeddings grow) with a full CLIP model folder as
  the tower (its file stores `vision_model.*` and a text model), square + flat;
* `checkpoint`: an HF-native VLM folder, `load_vlm_partitioned` vs `load_vlm`.

Saves (the `fresh` model, tower frozen, one optimizer step through a DeepSpeed engine): `zero.save_streamed` (one
file; and small shards with an index) vs today's save, which every rank's partition written with
`engine.save_checkpoint` and DeepSpeed's `zero_to_fp32` rebuilding the fp32 state on rank 0 for `save_pretrained`; and
the same with LoRA on the LLM (merged as the layers stream vs `merge_state_dict` on the rebuilt state).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlcd_vl.model import tiny  # noqa: E402
from mlcd_vl.model.build import VLMSpec, build_vlm  # noqa: E402
from mlcd_vl.model.checkpoint import load_vlm, save_vlm  # noqa: E402
from mlcd_vl.model.gathered import gathered, is_partitioned  # noqa: E402
from mlcd_vl.model.sharded import build_vlm_partitioned, load_vlm_partitioned  # noqa: E402
from mlcd_vl.train import lora, optim, zero  # noqa: E402
from mlcd_vl.train.config import LoraConfig, load_config  # noqa: E402

SEED = 42


def barrier() -> None:
    dist.barrier()


def write_assets(root: Path) -> dict:
    """Rank 0 writes, the others wait: the tiny assets, a no-room LLM, a full CLIP folder and a VLM folder."""
    paths = {"tiny": root / "tiny", "no_room_llm": root / "llm-no-room", "full_clip": root / "full-clip",
             "vlm": root / "vlm"}
    if dist.get_rank() == 0:
        from transformers import CLIPConfig, CLIPModel

        assets = tiny.write_tiny_assets(paths["tiny"])
        tokenizer = tiny.train_tokenizer(tiny.default_corpus())
        tiny.write_tiny_llm(paths["no_room_llm"], tokenizer, tiny.TinyShapes(vocab_padding=0))
        torch.manual_seed(3)
        clip = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=100),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=56, patch_size=14), projection_dim=16)
        CLIPModel(clip).save_pretrained(paths["full_clip"])
        model, tokenizer, settings = build_vlm(tiny.tiny_spec(assets, seed=SEED))
        save_vlm(model, tokenizer, settings, paths["vlm"])
    barrier()
    assets = tiny.write_tiny_assets(paths["tiny"])
    return {**paths, "llm": assets["llm"], "tower": assets["tower"]}


def compare(whole, part) -> dict:
    """Every rank: names, dtypes and values (bit for bit) of a whole model and a partitioned one."""
    whole_params, part_params = dict(whole.named_parameters()), dict(part.named_parameters())
    differ = []
    for name, param in part_params.items():
        with gathered([param]):
            other = whole_params.get(name)
            if other is None or param.dtype != other.dtype or not torch.equal(param.data, other.data):
                differ.append(name)
    world = dist.get_world_size()
    return {"names_equal": list(whole_params) == list(part_params), "differ": differ,
            "unpartitioned": [name for name, p in part_params.items() if not is_partitioned(p)],
            "local_fraction": sum(p.ds_tensor.numel() for p in part_params.values() if is_partitioned(p))
            / sum(p.ds_numel for p in part_params.values() if is_partitioned(p)),
            "expected_fraction": sum(-(-p.ds_numel // world) for p in part_params.values() if is_partitioned(p))
            / sum(p.ds_numel for p in part_params.values() if is_partitioned(p)),
            "config_equal": whole.config.to_dict() == part.config.to_dict(),
            "generation_equal": whole.generation_config.to_dict() == part.generation_config.to_dict(),
            "vocab": part.config.text_config.vocab_size, "image_token_id": part.config.image_token_id}


def ds_config() -> dict:
    config = load_config(REPO / "configs" / "recipes" / "tiny_stage2.yaml", [
        f"deepspeed={REPO / 'configs' / 'deepspeed' / 'zero3.json'}", "batch.per_device_batch_size=1",
        "batch.grad_accum=1"])
    return zero.deepspeed_config(config, 64, dist.get_world_size(), "fp32")


def one_step(model, ds: dict):
    """A DeepSpeed engine over `model` and one AdamW step on a text-only batch (the tower is frozen)."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=ds)
    torch.manual_seed(dist.get_rank())
    ids = torch.randint(0, 100, (1, 12))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return engine


def todays_save(engine, vlm, tokenizer, settings, folder: Path, tuner) -> None:
    """The final save before streaming: sharded checkpoint, zero_to_fp32 on rank 0, LoRA merged on the rebuilt
    state and the module un-injected, save_pretrained(state_dict)."""
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    scratch = folder.parent / (folder.name + ".tmp")
    engine.save_checkpoint(str(scratch), tag="final")
    barrier()
    if dist.get_rank() == 0:
        state = get_fp32_state_dict_from_zero_checkpoint(str(scratch), tag="final")
        if tuner is not None:
            state = lora.merge_state_dict(state, lora.layer_scalings(vlm))
            vlm = tuner.unload()
        save_vlm(vlm, tokenizer, settings, folder, state_dict=state)
        shutil.rmtree(scratch)
    barrier()


def streamed_save(vlm, tokenizer, settings, folder: Path, scalings: dict | None, **kwargs) -> None:
    if dist.get_rank() == 0:
        save_vlm(vlm, tokenizer, settings, folder, weights=False)
    barrier()
    zero.save_streamed(vlm, folder, scalings=scalings, **kwargs)
    barrier()


def compare_folders(new: Path, old: Path) -> dict:
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    def tensors(folder: Path) -> dict:
        found = {}
        for file in sorted(folder.glob("model*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                found.update({key: handle.get_tensor(key) for key in handle.keys()})
        return found

    a, b = tensors(new), tensors(old)
    loaded = AutoModelForImageTextToText.from_pretrained(new).state_dict()
    reference = AutoModelForImageTextToText.from_pretrained(old).state_dict()
    return {"files": sorted(p.name for p in new.glob("model*")),
            "keys_equal": sorted(a) == sorted(b), "no_adapter_keys": not any(".lora_" in k or "base_layer" in k
                                                                             for k in a),
            "differ": sorted(k for k in a if k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])),
            "bytes_equal": (new / "model.safetensors").is_file() and (old / "model.safetensors").is_file()
            and (new / "model.safetensors").read_bytes() == (old / "model.safetensors").read_bytes(),
            "config_equal": json.loads((new / "config.json").read_text()) == json.loads((old / "config.json")
                                                                                          .read_text()),
            "loaded_equal": loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k])
                                                                      for k in loaded)}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank0 = dist.get_rank() == 0
    paths = write_assets(out / "assets")
    ds = ds_config()
    report: dict = {"world_size": dist.get_world_size()}

    fresh = tiny.tiny_spec({"llm": paths["llm"], "tower": paths["tower"]}, seed=SEED)
    resized = VLMSpec(llm=str(paths["no_room_llm"]), tower=str(paths["full_clip"]), image_mode="square",
                      merge_type="flat", seed=SEED)
    for name, spec in (("fresh", fresh), ("resized", resized)):
        torch.manual_seed(SEED)  # as the run's set_seed: building draws from the global generator
        whole, _, _ = build_vlm(spec)
        generator_after_whole = torch.random.get_rng_state()
        torch.manual_seed(SEED)
        part, tokenizer, settings = build_vlm_partitioned(spec, ds)
        report[name] = compare(whole, part)
        report[name]["generator_equal"] = torch.equal(generator_after_whole, torch.random.get_rng_state())
        del whole, part
    whole, _, _ = load_vlm(paths["vlm"], dtype=torch.float32)
    part, _, _ = load_vlm_partitioned(paths["vlm"], ds)
    report["checkpoint"] = compare(whole, part)
    del whole, part

    for name, with_lora in (("save", False), ("save_lora", True)):
        vlm, tokenizer, settings = build_vlm_partitioned(fresh, ds)
        optim.apply_tunable_parts(vlm, "mm_mlp_adapter,mm_language_model")
        tuner = lora.apply_lora(vlm, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0),
                                ["mm_mlp_adapter", "mm_language_model"], SEED) if with_lora else None
        engine = one_step(vlm, ds)
        scalings = lora.layer_scalings(vlm) if with_lora else None
        streamed_save(vlm, tokenizer, settings, out / f"{name}-streamed", scalings)
        if not with_lora:
            streamed_save(vlm, tokenizer, settings, out / f"{name}-shards", None, max_shard_size=40_000)
        todays_save(engine, vlm, tokenizer, settings, out / f"{name}-today", tuner)
        if rank0:
            report[name] = compare_folders(out / f"{name}-streamed", out / f"{name}-today")
            if not with_lora:
                report[name + "_shards"] = compare_folders(out / f"{name}-shards", out / f"{name}-today")
                index = json.loads((out / f"{name}-shards" / "model.safetensors.index.json").read_text())
                report[name + "_shards"]["index_total_size"] = index["metadata"]["total_size"]
        barrier()
    if rank0:
        (out / "probe.json").write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
