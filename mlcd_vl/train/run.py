"""Train a VLM from a recipe: `python -m mlcd_vl.train RECIPE [section.key=value ...]`.

One linear recipe for both stages (upstream's `train()`), read top to bottom:

1. config: recipe YAML + dotted overrides -> `TrainConfig`, its inputs checked (`inputs`: data files, model sources),
   written back as `<output_dir>/train_config.yaml`;
2. model: `build_vlm` from the LLM and the tower (stage 1: square + flat, a `LlavaForConditionalGeneration`;
   stage 2: anyres + spatial_unpad, a `LlavaNextForConditionalGeneration`), the stage-1 projector loaded when
   `model.init_from` names one; `tiny` as LLM or tower means the locally written tiny preset;
3. freezing by tunable parts, AdamW over per-part LR groups, warm-up + cosine (or linear / constant) schedule;
4. data: `SupervisedDataset`, an exact length scan, length-grouped (padding) or packed batches;
5. each optimizer step: its `grad_accum` micro-batches are gathered first, the step's supervised-token count is
   planned (all-reduced), then forward + backward per micro-batch (no DDP sync but for the last), clipping, step;
   a micro-batch whose records were all skipped trains on a zero-loss stand-in so ranks stay in step;
6. logging (loss, LR per group, grad norm, throughput, padding, MFU estimate) to the console, a progress bar,
   `<output_dir>/metrics.jsonl` and `<output_dir>/loss_curve.png`;
7. the final save: an HF-native folder (loads with `AutoModelForImageTextToText`) and, for stage 1, the projector
   artifact `projector.safetensors` (+ upstream's `mm_projector.bin` with `save_upstream_projector=true`).

Launch: one process as is; several with `accelerate launch [--use_deepspeed ...] -m mlcd_vl.train RECIPE` or
`torchrun --nproc_per_node N -m mlcd_vl.train RECIPE`; the recipe's `deepspeed:` JSON is used when set.
Checkpoints every `save_steps` (`checkpointing`), resumed from the newest one by default (`resume: latest`).
DeepSpeed (`zero`): the recipe's JSON with every "auto" filled from the recipe; torch AdamW and our schedule are
handed over (the schedule stays ours: stepped once per optimizer step, saved with the checkpoint). Under ZeRO-3 the
model is built partitioned (`model.sharded`, unless `model.sharded_init=false`) and the final weights are streamed
into the folder shard by shard (`zero.save_streamed`). LoRA (`lora`): adapters on the LLM, merged before the final
save (with ZeRO-3 layer by layer as the weights stream, since the module's parameters are partitioned).
Logging: `report_to: tensorboard | wandb` (accelerate's trackers; `WANDB_MODE=offline` works without a key).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("mlcd_vl.train")
PROBLEMS_FILE, METRICS_FILE, LOSS_CURVE_FILE = "data_problems.json", "metrics.jsonl", "loss_curve.png"
MANIFEST_FILE = "data_manifest.json"  # what this run sees (data.manifest); its hash also goes into config.json


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="training recipe YAML (configs/recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. optim.lr=2e-5 batch.grad_accum=4 output_dir=runs/x")


def run(args: argparse.Namespace) -> int:
    from mlcd_vl.train.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    result = train(load_config(args.recipe, args.overrides))
    if result.history:  # the main process
        print(f"done: {result.output_dir} after {result.steps} optimizer step(s)")
    return 0


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)  # the logged metrics records (main process)
    skipped: dict = field(default_factory=dict)  # records skipped while training, all ranks: ProblemLog.to_dict()
    scan_skipped: dict = field(default_factory=dict)  # records left out by the length scan
    projector_origin: str | None = None  # the stage-1 projector file loaded (stage 2)
    model: torch.nn.Module | None = field(default=None, repr=False)  # the final (merged) VLM, main process


def _accelerator(config, hidden_size: int):
    """accelerate's Accelerator for this recipe (DeepSpeed when the recipe names a config)."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin

    from mlcd_vl.train.zero import deepspeed_config

    state = PartialState(cpu=not torch.cuda.is_available())
    precision = config.precision_for(state.device.type)
    # DeepSpeed on CPU: the process group is already gloo (PartialState(cpu=True) above); cpu=True here would make
    # accelerate silently drop the DeepSpeed plugin and fall back to DDP.
    kwargs = {"cpu": not torch.cuda.is_available() and not config.deepspeed,
              "mixed_precision": {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]}
    if config.report_to != "none":
        kwargs.update(log_with=config.report_to, project_dir=config.output_dir)
    if config.deepspeed:
        ds = deepspeed_config(config, hidden_size, state.num_processes, precision)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
    return Accelerator(**kwargs)


def train(config) -> TrainResult:
    """Run the recipe `config` (a validated `TrainConfig`) to its final save."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from mlcd_vl.console import quiet_deepspeed_cpu_notice
    from mlcd_vl.data.dataset import LENGTHS_FILE
    from mlcd_vl.data.problems import ProblemLog
    from mlcd_vl.model.checkpoint import save_vlm
    from mlcd_vl.train import checkpointing, loader, lora, metrics, models, optim, zero
    from mlcd_vl.train.config import save_resolved
    from mlcd_vl.train.head_loss import HeadLossSettings
    from mlcd_vl.train.inputs import check_inputs
    from mlcd_vl.train.step import TrainingForward, optimizer_step

    # 1. Config ---------------------------------------------------------------------------------------------------
    check_inputs(config)  # a missing data file or model folder stops here, before anything is built or written
    if config.deepspeed:
        zero.single_process_launch_env()  # DeepSpeed needs a process group, even for one process
    else:
        quiet_deepspeed_cpu_notice()  # saving imports DeepSpeed when it is installed, and on CPU it says so
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" / "Writing model shards" bars: not news
    state = PartialState(cpu=not torch.cuda.is_available())  # on CPU, torchrun's ranks need cpu=True (gloo)
    main, world_size = state.is_main_process, state.num_processes
    output_dir = Path(config.output_dir)
    config.batch.check(world_size)
    if main:
        save_resolved(config, output_dir)
    set_seed(config.seed)
    stage1 = config.stage1
    say = print if main else (lambda *_: None)
    say(f"stage {1 if stage1 else 2}: effective {config.batch.describe(world_size)}"
        + (f"; deepspeed {config.deepspeed}" if config.deepspeed else "") + f"; output {output_dir}")

    # 2. Model ----------------------------------------------------------------------------------------------------
    if config.model.sharded_init and zero.zero3_requested(config):
        with state.main_process_first():  # the tiny preset written, the weights fetched, once
            models.fetch_sources(config)
        ds = zero.deepspeed_config(config, models.llm_hidden_size(config), world_size,
                                   config.precision_for(state.device.type))
        vlm, tokenizer, settings, origin = models.build_model(config, ds)  # every rank at once: partitioned
        say(f"model built partitioned under ZeRO-3 across {world_size} process(es) (model.sharded_init)")
    else:
        with state.main_process_first():  # the tiny preset is written once
            vlm, tokenizer, settings, origin = models.build_model(config)
    if origin:
        say(f"projector loaded from {origin}")
    if config.model.checkpoint:
        say(f"continuing from {config.model.checkpoint} (its weights, tokenizer and image settings)")

    # 3. What trains, optimizer ------------------------------------------------------------------------------------
    optim.apply_tunable_parts(vlm, config.tunable_parts)
    frozen = optim.freeze_unreached(vlm)  # no gradient can reach them; DDP would fail on them
    tuner = lora.apply_lora(vlm, config.lora, config.tunable_parts_list, config.seed) if config.lora.enabled else None
    summary = optim.parameter_summary(vlm)
    if frozen:
        say(f"{len(frozen)} vision-tower tensor(s) after the feature layer stay frozen (no gradient reaches them)")
    say(optim.format_parameter_summary(summary))
    flops = metrics.FlopsModel.from_summary(summary)
    optimizer = optim.build_optimizer(vlm, config.optim)
    group_names = [group["name"] for group in optimizer.param_groups]
    accelerator = _accelerator(config, vlm.config.text_config.hidden_size)

    # 4. Data -----------------------------------------------------------------------------------------------------
    with state.main_process_first():  # the main process scans; the others read its lengths
        data = loader.build_data(config, tokenizer, settings, rank=state.process_index, world_size=world_size,
                               progress=main, table_path=output_dir / LENGTHS_FILE, scan=main)
    if config.data.token_budget and not config.data.packing:
        say("note: data.token_budget only applies to packing; padded batches use batch.per_device_batch_size")
    if config.data.packing:
        say(f"packing: rows of <= {config.data.token_budget} tokens, {config.text_attention} attention per sample"
            + (" through a 4D block-diagonal mask (O(T^2) memory)" if config.packed_4d_mask else ""))
    if config.data.order_file:
        say(f"data order replayed from {config.data.order_file}")
    if main and data.scan_log.total:
        say(data.scan_log.summary("left out by the length scan"))
    if data.start is not None:  # the main process: pin the data this run sees
        data.start.manifest.save(output_dir / MANIFEST_FILE)
        settings.data_manifest = data.start.manifest.hash
        say(f"{data.start.describe()} -> {output_dir / MANIFEST_FILE}")
    micro_per_epoch = len(data.sampler)
    steps_per_epoch = math.ceil(micro_per_epoch / config.batch.grad_accum)
    total_steps = config.optim.max_steps or max(1, math.ceil(config.optim.num_epochs * steps_per_epoch))
    scheduler = optim.build_scheduler(optimizer, config.optim, total_steps)
    say(f"{len(data.table.valid)} records, {micro_per_epoch} micro-batch(es) per epoch on each of {world_size} "
        f"process(es), {steps_per_epoch} step(s) per epoch, {total_steps} step(s) in all")

    head_loss = HeadLossSettings.from_config(config.optim)
    say(head_loss.describe(accelerator.device.type))
    model = TrainingForward(vlm, settings, head_loss)
    # The schedule stays ours under DeepSpeed too: stepped once per optimizer step by `step.optimizer_step` and
    # saved as a custom checkpoint object (accelerate would step a prepared LambdaLR once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    model.train()
    if config.report_to != "none":
        accelerator.init_trackers("mlcd_vl", config=metrics.tracker_config(config),
                                  init_kwargs=metrics.tracker_init_kwargs(config.report_to, output_dir))

    # 5. Loop (resuming from the newest checkpoint when there is one) ---------------------------------------------
    step, epoch, consumed, run_log = 0, 0, 0, ProblemLog()
    resume_from = checkpointing.find_resume(config.resume, output_dir)
    if resume_from is not None:
        resumed = checkpointing.load_checkpoint(accelerator, resume_from)
        step, epoch, consumed = resumed["step"], resumed["epoch"], resumed["sampler"]["position"]
        data.sampler.load_state_dict(resumed["sampler"])
        run_log.merge_counts(resumed["skipped"]["counts"], resumed["skipped"]["examples"])
        say(f"resumed from {resume_from}: step {step}, epoch {epoch}, {consumed} micro-batch(es) into it")
    peak = metrics.peak_flops(accelerator.device)
    writer = metrics.MetricsWriter(output_dir / METRICS_FILE, keep_until=step) if main else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    crop_tokens = models.tokens_per_crop(vlm)
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not main)
    window, window_start = metrics.StepCounts(), time.perf_counter()
    while step < total_steps:
        data.sampler.set_epoch(epoch)  # keeps a resumed position within the same epoch
        epoch_log = ProblemLog()
        for micro_batches in loader.micro_batch_groups(data.loader, config.batch.grad_accum):
            counts, grad_norm, lrs = optimizer_step(accelerator, model, optimizer, scheduler,
                                                         micro_batches, config, epoch_log, pad_id, crop_tokens)
            step, consumed = step + 1, consumed + len(micro_batches)
            window = metrics.StepCounts.from_tensor(window.as_tensor() + counts.as_tensor())
            bar.update(1)
            if step % config.logging_steps == 0 or step == total_steps:
                totals = metrics.StepCounts.from_tensor(
                    accelerator.reduce(window.as_tensor().to(accelerator.device), "sum").cpu())
                record = metrics.step_record(step, step / steps_per_epoch, totals,
                                             time.perf_counter() - window_start, dict(zip(group_names, lrs)),
                                             grad_norm, flops, peak, world_size)
                if writer is not None:
                    writer.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    bar.write(metrics.format_record(record))
                if config.report_to != "none":
                    accelerator.log(metrics.tracker_values(record), step=step)
                window, window_start = metrics.StepCounts(), time.perf_counter()
            if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                so_far = ProblemLog()
                for part in (run_log, epoch_log.gather()):  # gather: every rank takes part
                    so_far.merge_counts(part.counts, part.examples)
                trainer_state = {"step": step, "epoch": epoch, "sampler": data.sampler.state_dict(consumed=consumed),
                                 "skipped": so_far.to_dict()}
                saved = checkpointing.save_checkpoint(accelerator, output_dir, step, trainer_state,
                                                      config.save_total_limit)
                if main:
                    bar.write(f"saved {saved}")
            if step >= total_steps:
                break
        gathered = epoch_log.gather()  # every rank takes part
        run_log.merge_counts(gathered.counts, gathered.examples)
        if main:
            bar.write(gathered.summary(f"epoch {epoch}: skipped records"))
        epoch, consumed = epoch + 1, 0
    bar.close()

    # 6. Save -----------------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    vlm = accelerator.unwrap_model(model).vlm
    projector = None
    if accelerator.distributed_type == "DEEPSPEED" and zero.zero_stage(accelerator) == 3:
        # partitioned: every rank gathers parameter by parameter, the main process writes shard by shard
        if main:  # config, tokenizer and processor first (save_pretrained clears older weight files)
            save_vlm(vlm, tokenizer, settings, output_dir, weights=False)
        accelerator.wait_for_everyone()
        projector = zero.save_streamed(vlm, output_dir, scalings=lora.layer_scalings(vlm) if tuner else None,
                                       keep_prefix=optim.PROJECTOR_PREFIX if stage1 else None)
        if tuner is not None:
            vlm = tuner.unload()  # the adapters were merged into the saved weights
    elif main:
        if tuner is not None:
            vlm = lora.merge(tuner)  # a plain model again: the saved folder needs no PEFT
        save_vlm(vlm, tokenizer, settings, output_dir)
    final = None
    if main:
        final = vlm
        if stage1:
            optim.save_projector(vlm, output_dir, upstream_bin=config.save_upstream_projector, state=projector)
        problems = {"scan": data.scan_log.to_dict(), "training": run_log.to_dict()}
        (output_dir / PROBLEMS_FILE).write_text(json.dumps(problems, indent=2) + "\n")
        writer.close()
        metrics.plot_loss_curve(writer.records, output_dir / LOSS_CURVE_FILE,
                                title=f"stage {1 if stage1 else 2}: {output_dir.name}")
        say(f"saved {output_dir}")
    accelerator.wait_for_everyone()
    if config.report_to != "none":
        accelerator.end_training()
    return TrainResult(output_dir, step, list(writer.records) if writer else [], run_log.to_dict(),
                       data.scan_log.to_dict(), origin, final)
