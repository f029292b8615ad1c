"""The pieces `run.py` strings together: model, data, DeepSpeed config and one optimizer step.

Distribution is accelerate's business (device, DDP, DeepSpeed), set up from outside (`accelerate launch`,
`torchrun`); nothing here branches on it except where accelerate leaves a choice to the caller:

* the samplers shard the data themselves (every rank computes the same global plan and takes its share), so the
  DataLoader is NOT passed to `accelerator.prepare` (it would shard a second time);
* the LR scheduler is stepped here once per optimizer step (accelerate would step a prepared scheduler once per
  process), under DeepSpeed too (it is not handed to the engine, which only steps DeepSpeed's own schedules);
* the loss is normalised by `train.loss` for the whole step, so accelerate must not divide it by the accumulation
  steps (gradient_accumulation_steps stays 1 outside DeepSpeed; under DeepSpeed `scale_wrt_gas=False`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mlcd_vl.data.collate import PaddingCollator
from mlcd_vl.data.dataset import LengthTable, SupervisedDataset
from mlcd_vl.data.dataset import scan as scan_lengths
from mlcd_vl.data.packing import PackingCollator
from mlcd_vl.data.problems import ProblemLog
from mlcd_vl.data.samplers import LengthGroupedBatchSampler, PackedBatchSampler
from mlcd_vl.data.samples import DataConfig as SampleConfig
from mlcd_vl.model.build import VLMSettings, VLMSpec, build_vlm
from mlcd_vl.model.varlen import MASK_FREE_IMPLEMENTATIONS, composite_attention
from mlcd_vl.train import optim
from mlcd_vl.train.config import TrainConfig
from mlcd_vl.train.metrics import StepCounts
from mlcd_vl.train.step import TrainBatch, plan_micro_batches
from mlcd_vl.vocab import IGNORE_INDEX

TINY = "tiny"
TINY_DIR_ENV = "MLCD_VL_TINY_DIR"  # where `tiny` assets are written (default: <output_dir>/tiny-assets)


def is_stage1(config: TrainConfig) -> bool:
    """Stage 1 = only the projector trains (upstream's pretraining)."""
    return config.tunable_parts_list == ["mm_mlp_adapter"]


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def resolve_sources(config: TrainConfig) -> tuple[str, str]:
    """(llm, tower) paths or ids; `tiny` becomes the locally written tiny preset (reused when already there)."""
    llm, tower = config.model.llm, config.model.tower
    if TINY in (llm, tower):
        from mlcd_vl.model.tiny import write_tiny_assets

        root = os.environ.get(TINY_DIR_ENV) or str(Path(config.output_dir) / "tiny-assets")
        paths = write_tiny_assets(root)
        llm = str(paths["llm"]) if llm == TINY else llm
        tower = str(paths["tower"]) if tower == TINY else tower
    return llm, tower


def build_model(config: TrainConfig):
    """The composite for this stage, the stage-1 projector loaded when `model.init_from` is set.

    Returns (model, tokenizer, settings, projector file read or None).
    """
    llm, tower = resolve_sources(config)
    spec = VLMSpec(llm=llm, tower=tower, image_mode=config.model.image_mode, merge_type=config.model.merge_type,
                   pinpoints=config.model.pinpoints, template=config.model.template, dtype="float32",
                   seed=config.seed)
    model, tokenizer, settings = build_vlm(spec)
    settings.llm, settings.tower = config.model.llm, config.model.tower  # provenance as the recipe names them
    model.set_attn_implementation(composite_attention(config.model.attn_implementation, config.data.packing))
    origin = None
    if config.model.init_from:
        origin = optim.load_projector(model, config.model.init_from, allow_pickle=config.model.allow_pickle)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, settings, origin


def packed_attention(config: TrainConfig) -> str:
    """The language model's attention implementation this run's packed rows will meet."""
    attention = composite_attention(config.model.attn_implementation, config.data.packing)
    return attention["text_config"] if isinstance(attention, dict) else attention


def tokens_per_crop(model) -> int:
    """Tokens one crop puts through the vision tower (patches + CLS), for the FLOPs estimate."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    dataset: SupervisedDataset
    table: LengthTable
    sampler: LengthGroupedBatchSampler | PackedBatchSampler
    loader: torch.utils.data.DataLoader
    scan_log: ProblemLog


def build_data(config: TrainConfig, tokenizer, settings: VLMSettings, *, rank: int, world_size: int,
               progress: bool, table_path: Path | None = None, scan: bool = True) -> Data:
    """Dataset, exact lengths (records that fail the scan are left out up front), sampler and DataLoader.

    With `scan=False` the lengths are read from `table_path`, which the scanning process wrote (so only the main
    process of a distributed run reads every image header).
    """
    sample_config = SampleConfig(data=config.data.train, image_folder=config.data.image_folder,
                                 max_length=config.data.max_length, label_mode=config.data.label_mode,
                                 seed=config.seed)
    dataset = SupervisedDataset.from_config(sample_config, tokenizer, settings)
    scan_log = ProblemLog()
    if scan:
        table = scan_lengths(dataset, workers=config.data.num_workers, progress=progress, log=scan_log)
        if table_path is not None:
            table_path.parent.mkdir(parents=True, exist_ok=True)
            table.save(str(table_path))
    else:
        table = LengthTable.load(str(table_path))
    if not len(table.valid):
        raise ValueError(f"{config.data.train}: no usable record ({scan_log.summary()})")
    if config.data.packing:
        sampler = PackedBatchSampler(table.lengths, config.data.token_budget, world_size=world_size, rank=rank,
                                     seed=config.seed, drop_last=config.data.drop_last)
        collator = PackingCollator.for_model(
            tokenizer, build_4d_mask=packed_attention(config) not in MASK_FREE_IMPLEMENTATIONS)
    else:
        sampler = LengthGroupedBatchSampler(table.lengths, table.has_image, config.batch.per_device_batch_size,
                                            world_size=world_size, rank=rank, grad_accum=config.batch.grad_accum,
                                            group_by_modality=config.data.group_by_modality, seed=config.seed,
                                            drop_last=config.data.drop_last)
        collator = PaddingCollator.for_model(tokenizer)
    workers = config.data.num_workers
    # Its own generator: starting an iterator draws a base seed, which must not come from the global RNG (a run
    # resumed mid-epoch starts one more iterator than the uninterrupted run, so dropout masks would differ).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=2 if workers else None,
                                         generator=torch.Generator().manual_seed(config.seed))
    return Data(dataset, table, sampler, loader, scan_log)


def micro_batch_groups(loader, grad_accum: int):
    """The loader's batches in lists of `grad_accum` (the last one of an epoch may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


def empty_stand_in(pad_token_id: int) -> TrainBatch:
    """What a micro-batch whose records were all skipped trains on: two padding tokens, nothing supervised.

    `forward_loss` then runs the dummy crop through tower and projector and the whole language model, with a loss
    of exactly zero, so every rank does the same forward/backward (same collectives under DDP / ZeRO-3).
    """
    ids = torch.full((1, 2), pad_token_id, dtype=torch.long)
    return TrainBatch(ids, torch.full_like(ids, IGNORE_INDEX), torch.ones_like(ids), None, [])


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------------------------


def deepspeed_config(config: TrainConfig, hidden_size: int, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON with every "auto" filled from the recipe (as the HF Trainer would)."""
    ds = json.loads(Path(config.deepspeed).read_text())
    fill = {"train_micro_batch_size_per_gpu": 1 if config.data.packing else config.batch.per_device_batch_size,
            "gradient_accumulation_steps": config.batch.grad_accum,
            "gradient_clipping": config.optim.max_grad_norm or 0.0}
    fill["train_batch_size"] = fill["train_micro_batch_size_per_gpu"] * world_size * config.batch.grad_accum
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key, enabled in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if key in ds and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = enabled
    zero = ds.get("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"{config.deepspeed}: remove the {section!r} block; the recipe builds torch AdamW and "
                             "the schedule (optim.*)")
    return ds


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------


def optimizer_step(accelerator, model, optimizer, scheduler, micro_batches: list[dict], config: TrainConfig,
                   problems: ProblemLog, pad_token_id: int, crop_tokens: int,
                   ) -> tuple[StepCounts, float | None, list[float]]:
    """Plan the step's token count, forward/backward every micro-batch, clip, step.

    Returns the step's counts (this rank), the gradient norm before clipping and the learning rate of each
    optimizer group used by this step.
    """
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    batches = []
    for batch in micro_batches:
        problems.extend(batch["skipped"])
        empty = not batch["record_ids"]
        batches.append(empty_stand_in(pad_token_id) if empty else TrainBatch.from_collated(batch))
    step_tokens = plan_micro_batches(batches, config.optim.loss_normalisation)  # all-reduced across ranks
    counts = StepCounts()
    from accelerate.utils import DistributedType

    backward_kwargs = {"scale_wrt_gas": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    for index, (raw, batch) in enumerate(zip(micro_batches, batches)):
        last = index == len(batches) - 1
        accelerator.sync_gradients = last  # DeepSpeed: the accumulation boundary is the step's last micro-batch
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            output = model(batch, step_tokens)
            accelerator.backward(output.loss, **backward_kwargs)
        if raw["record_ids"]:
            counts.add_batch(raw, output.loss_sum.item(), output.supervised_tokens, crop_tokens)
        else:
            counts.empty_micro_batches += 1
    max_norm = config.optim.max_grad_norm or 0.0
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    optimizer.step()
    if scheduler is not None and not getattr(optimizer, "step_was_skipped", False):
        scheduler.step()  # not after an fp16 overflow skip (GradScaler or DeepSpeed's loss scaler), as HF Trainer
    optimizer.zero_grad(set_to_none=True)
    grad_norm = float(norm) if norm is not None else None
    return counts, grad_norm, lrs
