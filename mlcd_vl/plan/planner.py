"""A recipe + a cluster -> the plan: memory per GPU for every ZeRO setting, host memory per node, steps, time, and
what to change when it does not fit. The result is one JSON-able dict (`make_plan`); `report` prints it.

Scenarios: DDP (no DeepSpeed), ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload, their bucket sizes from the
configs next to the recipe's DeepSpeed file (configs/deepspeed/zero2.json for stages 1-2, zero3.json,
zero3_offload.json) with "auto" filled as training fills it (`train.zero.deepspeed_config`); the recipe's own
DeepSpeed file is always one of them (marked). Every scenario uses the recipe's precision, micro-batch and gradient
checkpointing; the suggestions try the alternatives.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlcd_vl.plan import memory
from mlcd_vl.plan.memory import GIB, Precision, Sharding

GPU_MEMORY_GIB = {"H100": 80.0, "H200": 141.0, "A100": 80.0}
DEFAULT_RESERVE_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation: an allowance, not a measurement
SCENARIO_FILES = ((1, "zero2.json"), (2, "zero2.json"), (3, "zero3.json"), (3, "zero3_offload.json"))
PACKED_BUDGET_STEP = 256


@dataclass
class PlanRequest:
    """The cluster and the assumptions of a plan (the command's options)."""

    gpus: int
    nodes: int = 1
    gpu: str = "H100"
    gpu_memory_gib: float | None = None  # None: the GPU type's
    mfu: float = 0.40
    lengths: str | None = None  # lengths.npz
    # supervised tokens / positions of the largest micro-batch; None: from the length table's supervised counts
    # where it has them, else 1.0 (the bound: every position)
    supervised_fraction: float | None = None
    reserve_gib: float = DEFAULT_RESERVE_GIB
    host_memory_gib: float | None = None  # per node, for the verdict
    samples: int | None = None  # records, when there is no length table and no dataset preset
    text_tokens: int = 256  # text tokens of a typical sample, when there is no length table

    def check(self) -> None:
        if self.gpus < 1 or self.nodes < 1 or self.gpus % self.nodes:
            raise ValueError(f"--gpus {self.gpus} must be a positive multiple of --nodes {self.nodes}")
        if self.gpu not in GPU_MEMORY_GIB:
            raise ValueError(f"--gpu {self.gpu!r}: one of {', '.join(GPU_MEMORY_GIB)}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu {self.mfu}: a fraction in (0, 1]")
        if self.supervised_fraction is not None and not 0 < self.supervised_fraction <= 1:
            raise ValueError(f"--supervised-fraction {self.supervised_fraction}: a fraction in (0, 1]")

    @property
    def gpu_bytes(self) -> float:
        return (self.gpu_memory_gib or GPU_MEMORY_GIB[self.gpu]) * GIB


def _filled(config, path: Path, hidden: int, world: int, precision: str, stage: int | None = None) -> dict:
    from mlcd_vl.train.zero import deepspeed_config

    recipe = copy.copy(config)
    recipe.deepspeed = str(path)
    ds = deepspeed_config(recipe, hidden, world, precision)
    if stage is not None:
        ds["zero_optimization"]["stage"] = stage
    return ds


def scenarios(config, hidden: int, world: int, precision: str) -> list[tuple[Sharding, bool]]:
    """(sharding, is the recipe's) for DDP, ZeRO-1/2/3 and ZeRO-3 + offload, and the recipe's own if different."""
    own = Sharding.from_deepspeed(_filled(config, Path(config.deepspeed), hidden, world, precision)
                                  if config.deepspeed else None)
    folder = Path(config.deepspeed).parent if config.deepspeed else Path(__file__).resolve().parents[2] / "configs" \
        / "deepspeed"
    found = [Sharding(stage=0)]
    for stage, name in SCENARIO_FILES:
        path = folder / name
        found.append(Sharding.from_deepspeed(_filled(config, path, hidden, world, precision, stage))
                     if path.is_file() else Sharding(stage=stage, offload_optimizer="offload" in name,
                                                     offload_params="offload" in name,
                                                     reduce_bucket=hidden * hidden,
                                                     prefetch_bucket=int(0.9 * hidden * hidden),
                                                     persistence_threshold=10 * hidden))
    if own not in found:
        found.append(own)
    return [(sharding, sharding == own) for sharding in found]


def _activation_setup(config, shape, micro, e: int, checkpointing: bool) -> memory.ActivationRates:
    attention = config.text_attention  # what the LLM runs: packed rows on plain SDPA run sdpa_varlen
    eager = attention == "eager"
    gqa_expanded = eager or (not config.data.packing and micro.rows > 1 and attention in ("sdpa", "sdpa_varlen"))
    return memory.activation_rates(
        shape.llm, shape.tower, shape.projector_in, shape.projector_out, e,
        llm_trainable=shape.trains("language_model"), tower_trainable=shape.trains("vision_tower"),
        projector_trainable=shape.trains("projector"), checkpointing=checkpointing, eager=eager,
        row_length=micro.row_length, gqa_expanded=gqa_expanded)


def mask_bytes(config, micro, e: int) -> float:
    """The 4D attention mask shared by every layer: padded batches' (bool for SDPA, float for eager), or a packed
    row's block-diagonal one where the attention cannot bound samples itself (`TrainConfig.packed_4d_mask`: the
    collator's float32 mask and its copy in the compute dtype)."""
    if config.data.packing:
        return float((4 + e) * micro.positions**2) if config.packed_4d_mask else 0.0
    if micro.rows < 2 or config.text_attention == "flash_attention_2":
        return 0.0
    per_element = e if config.text_attention == "eager" else 1
    return float(per_element * micro.rows * micro.row_length**2)


def activation_bytes(rates: memory.ActivationRates, positions: float, crops: float, mask: float) -> float:
    return rates.per_position * positions + rates.per_crop * crops + mask


def largest_fitting_positions(budget: float, fixed: float, rates, crops_per_position: float,
                              loss_at: Callable[[int], float], mask_per_position2: float) -> int:
    """The most positions per micro-batch whose memory stays within `budget` (0 if none); `loss_at(positions)` is
    the loss term of a micro-batch of that many positions."""
    def total(positions: int) -> float:
        return (fixed + rates.per_position * positions + rates.per_crop * crops_per_position * positions
                + mask_per_position2 * positions**2 + loss_at(positions))

    if total(1) > budget:
        return 0
    low, high = 1, 1
    while total(high * 2) <= budget and high < 2**26:
        high *= 2
    high *= 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if total(middle) <= budget else (low, middle)
    return low


def host_terms(shape, sharding: Sharding, state: memory.StateMemory, ranks: int, records: int | None,
               precision: Precision, world: int, sharded_init: bool) -> dict:
    """Host bytes of one node: terms and the peaks of start-up, steady training and (node 0) the final save."""
    params = shape.params
    largest_tensor = max(shape.param_numels, default=0)
    if sharded_init and sharding.stage == 3:  # built partitioned, loaded one gathered tensor at a time
        build_resident = precision.weight_bytes * params / world
        build_peak = build_resident + precision.weight_bytes * largest_tensor
        build_note = ("partitioned build (model.sharded_init): the rank's partition plus one gathered tensor "
                      "(0.50x the model per rank at 2 ranks, measured)")
    else:
        build_peak = memory.HOST_BUILD_BYTES_PER_PARAM_PEAK * params
        build_resident = memory.HOST_BUILD_BYTES_PER_PARAM_RESIDENT * params
        build_note = (f"whole fp32 model built per rank before ZeRO ({memory.HOST_BUILD_BYTES_PER_PARAM_RESIDENT} "
                      f"B/param resident, {memory.HOST_BUILD_BYTES_PER_PARAM_PEAK} peak, measured)")
    data = memory.HOST_BYTES_PER_RECORD * records if records else 0.0
    offload = state.host_bytes()
    final_save = memory.HOST_SAVE_SHARD_BYTES + 4 * largest_tensor if sharding.stage == 3 else 0.0
    startup = ranks * (build_peak + data)
    steady = ranks * (build_resident + data + offload)
    terms = [{"name": "model build per rank", "bytes": ranks * build_peak, "note": build_note},
             {"name": "records per rank", "bytes": ranks * data,
              "note": (f"{records:,} records through the shared mapped index (75 MiB per 1M per rank, measured)"
                       if records else "unknown number of records")},
             {"name": "offloaded states", "bytes": ranks * offload,
              "note": "; ".join(f"{t.name}: {t.note}" for t in state.host) or "none"},
             {"name": "final ZeRO-3 save (node 0)", "bytes": final_save,
              "note": "streamed: one 2 GB shard and one gathered fp32 tensor on the main process" if final_save
              else "n/a"}]
    return {"terms": terms, "startup": startup, "steady": steady, "final_save": steady + final_save,
            "peak": max(startup, steady + final_save)}


def make_plan(config, request: PlanRequest, recipe: str = "", overrides: tuple[str, ...] = ()) -> dict:
    """The whole plan as a JSON-able dict (bytes as numbers)."""
    from mlcd_vl.plan import model_size, workload
    from mlcd_vl.plan.loss import LossModel
    from mlcd_vl.train.metrics import PEAK_BF16_FLOPS, FlopsModel
    from mlcd_vl.train.optim import PartCount

    request.check()
    world, ranks = request.gpus, request.gpus // request.nodes
    precision = Precision(config.precision_for("cuda"))
    e = precision.activation_bytes
    shape, settings = model_size.model_shape(config)
    lengths = workload.Lengths.load(request.lengths) if request.lengths else None
    geometry = workload.ImageGeometry.of(settings, shape.tower.tokens_per_crop)
    micro = workload.largest_micro_batch(config, lengths, geometry, world)
    fraction, fraction_source = supervised_fraction(request, micro)
    supervised = micro.positions * fraction
    budget = request.gpu_bytes
    reserve = request.reserve_gib * GIB
    loss_model = LossModel.of(config, shape, e)
    mask = mask_bytes(config, micro, e)
    rates = {gc: _activation_setup(config, shape, micro, e, gc) for gc in (True, False)}
    recipe_rates = rates[config.gradient_checkpointing]
    activations = activation_bytes(recipe_rates, micro.positions, micro.crops, mask)
    records = len(lengths.usable) if lengths is not None else (
        request.samples or workload.architectures.DATASET_SAMPLES.get(config.data.train))
    crops_per_position = micro.crops / max(micro.positions, 1)
    mask_per_position2 = mask / max(micro.positions, 1) ** 2

    rows = []
    for sharding, own in scenarios(config, shape.llm.hidden, world, precision.name):
        state = memory.state_memory(shape.params, shape.trainable_params, precision, sharding, world,
                                    param_numels=shape.param_numels, optimizer_groups=shape.optimizer_groups,
                                    largest_module=shape.largest_module)
        head_bytes = head_weight_bytes(sharding, precision)
        loss = loss_model.peak(supervised, head_bytes)
        gpu = {name: state.gpu_bytes(name) for name in ("parameters", "gradients", "optimizer states", "buffers")}
        gpu.update({"activations": activations, "loss": loss, "reserve": reserve})
        total = sum(gpu.values())
        fixed = total - activations - loss
        fits_positions = largest_fitting_positions(
            budget, fixed, recipe_rates, crops_per_position,
            lambda positions, w=head_bytes: loss_model.peak(positions * fraction, w), mask_per_position2)
        host = host_terms(shape, sharding, state, ranks, records, precision, world, config.model.sharded_init)
        rows.append({"scenario": sharding.label, "stage": sharding.stage, "recipe": own,
                     "offload_optimizer": sharding.offload_optimizer, "offload_params": sharding.offload_params,
                     "gpu": gpu, "gpu_terms": [t.__dict__ for t in state.gpu], "gpu_total": total,
                     "gpu_per_rank": state.per_rank,
                     "head_weight_bytes": head_bytes,
                     "fits": total <= budget, "largest_fitting_positions": fits_positions,
                     "host_per_node": host,
                     "host_fits": None if request.host_memory_gib is None
                     else host["peak"] <= request.host_memory_gib * GIB})

    peak = dict(PEAK_BF16_FLOPS)[request.gpu]
    flops_model = FlopsModel.from_summary({
        "language_model": PartCount(total=shape.total["language_model"]),
        "projector": PartCount(total=shape.total["projector"]),
        "vision_tower": PartCount(total=shape.total["vision_tower"])})
    run = workload.run_length(config, lengths, geometry, world, flops_model, samples=request.samples,
                              text_tokens=request.text_tokens)
    seconds = run.flops / (request.mfu * peak * world) if run else None
    plan = {
        "recipe": recipe, "overrides": list(overrides),
        "cluster": {"gpus": world, "nodes": request.nodes, "ranks_per_node": ranks, "gpu": request.gpu,
                    "gpu_memory_gib": budget / GIB, "peak_flops": peak, "mfu": request.mfu,
                    "host_memory_gib": request.host_memory_gib},
        "precision": precision.name, "gradient_checkpointing": config.gradient_checkpointing,
        "model": shape.to_dict(),
        "micro_batch": micro.to_dict(),
        "activations": {
            "with_checkpointing": {"per_position": rates[True].per_position, "per_crop": rates[True].per_crop,
                                   "micro_batch": activation_bytes(rates[True], micro.positions, micro.crops, mask)},
            "without_checkpointing": {"per_position": rates[False].per_position, "per_crop": rates[False].per_crop,
                                      "micro_batch": activation_bytes(rates[False], micro.positions, micro.crops,
                                                                      mask)},
            "attention_mask": mask},
        "loss": loss_summary(loss_model, supervised, fraction, next(r for r in rows if r["recipe"])),
        "reserve_gib": request.reserve_gib,
        "scenarios": rows,
        "run": None if run is None else {**run.to_dict(), "seconds": seconds, "hours": seconds / 3600},
        "assumptions": assumptions(request, lengths is None, fraction, fraction_source, loss_model),
    }
    if config.data.order_file:
        plan["assumptions"].append("data.order_file: training replays that file's micro-batches (any size); the "
                                   "micro-batches planned here are the recipe's sampler's")
    plan["suggestions"] = suggestions(config, plan, micro, rates, mask, budget, loss_model)
    return plan


def head_weight_bytes(sharding: Sharding, precision: Precision) -> int:
    """Bytes of an LM-head weight as the loss sees it: fp32 under DDP (autocast), the training dtype under ZeRO."""
    return 4 if sharding.stage == 0 else precision.weight_bytes


def loss_summary(loss_model, supervised: float, fraction: float, own: dict) -> dict:
    """The loss of the recipe's own scenario: the path training takes and both paths' bytes at the largest count."""
    w = own["head_weight_bytes"]
    return {"supervised_tokens": supervised, "supervised_fraction": fraction,
            "impl": loss_model.settings.impl, "chunk_tokens": loss_model.settings.chunk_tokens,
            "runs": loss_model.implementation(supervised, w), "how": loss_model.describe(supervised, w),
            "bytes": own["gpu"]["loss"],
            "full_bytes": loss_model.bytes_at(supervised, w, "full"),
            "chunked_bytes": loss_model.bytes_at(supervised, w, "chunked"),
            "bytes_per_logit": memory.LOSS_BYTES_PER_LOGIT, "vocab": loss_model.vocab}


def supervised_fraction(request: PlanRequest, micro) -> tuple[float, str]:
    """(supervised tokens per position of the largest micro-batch, where the figure comes from)."""
    if request.supervised_fraction is not None:
        return request.supervised_fraction, "--supervised-fraction"
    if micro.supervised is not None:
        return micro.supervised / max(micro.positions, 1), \
            f"the most supervised tokens of any micro-batch of epoch 0 ({micro.supervised:,}), from the length table"
    return 1.0, "every position supervised: an upper bound"


def assumptions(request: PlanRequest, no_table: bool, fraction: float, fraction_source: str,
                loss_model) -> list[str]:
    chunk = loss_model.settings.chunk_tokens
    notes = [f"reserve {request.reserve_gib:g} GiB per GPU for the CUDA context, NCCL and fragmentation",
             f"loss as training runs it (optim.loss_impl={loss_model.settings.impl}): full logits "
             f"{memory.LOSS_BYTES_PER_LOGIT} bytes per supervised token x vocabulary entry (measured); chunked: "
             f"the float32 [vocab, hidden] weight-gradient accumulator + {chunk} positions of float32 logits "
             f"({memory.CHUNK_BYTES_PER_LOGIT} B per entry) + the hidden states' gradient"
             + ("; auto: chunked only where that needs less memory, the worst micro-batch on either side of its "
                "threshold counted" if loss_model.settings.impl == "auto" else ""),
             f"supervised tokens = {fraction:.3g} x positions of the largest micro-batch ({fraction_source})",
             "one image per padded row; packed rows filled with the image size of the most crops per visual token",
             f"wall time at {100 * request.mfu:g}% MFU of {request.gpu} dense bf16 peak, training's FLOPs "
             "definition (6 x parameters x tokens)"]
    if no_table:
        notes.append("no length table: every row is data.max_length tokens long, a bound far above typical data; "
                     "give --lengths lengths.npz (written by `mlcd-vl data check` or `mlcd-vl train`) for the real "
                     "micro-batches")
    return notes



def suggestions(config, plan: dict, micro, rates: dict, mask: float, budget: float, loss_model) -> list[str]:
    """What to change, each with the per-GPU total it gives (re-computed, not guessed)."""
    rows = plan["scenarios"]
    own = next(r for r in rows if r["recipe"])
    gib = GIB
    out = []
    if own["fits"]:
        out.append(f"fits: {own['gpu_total'] / gib:.1f} of {budget / gib:.0f} GiB per GPU with {own['scenario']}; "
                   f"the largest micro-batch that fits holds {own['largest_fitting_positions']:,} positions "
                   f"(this one: {micro.positions:,})")
    else:
        out.append(f"does not fit: {own['gpu_total'] / gib:.1f} GiB per GPU with {own['scenario']} "
                   f"(budget {budget / gib:.0f} GiB)")
    host = own["host_per_node"]
    build = host["terms"][0]["bytes"]
    verdict = "" if own["host_fits"] is None else (" (fits)" if own["host_fits"] else " (does NOT fit)")
    out.append(f"host: {host['peak'] / gib:.0f} GiB per node at the peak{verdict}, {build / gib:.0f} GiB of it the "
               "model built per rank" + ("" if own["stage"] != 3 or config.model.sharded_init else
                                         " (model.sharded_init=true builds it partitioned)"))
    base = own["gpu_total"] - own["gpu"]["activations"]
    if not config.gradient_checkpointing:
        with_gc = base + activation_bytes(rates[True], micro.positions, micro.crops, mask)
        out.append(f"gradient_checkpointing=true: {with_gc / gib:.1f} GiB per GPU")
    loss = plan["loss"]
    if loss["runs"] == "full" and loss["bytes"] > 0.05 * budget:
        default = loss_model.with_settings("auto")  # training's default: chunked above the threshold, where it pays
        if default.implementation(loss["supervised_tokens"], own["head_weight_bytes"]) != "full":
            chunked = default.peak(loss["supervised_tokens"], own["head_weight_bytes"])
            out.append(f"chunked loss (optim.loss_impl=auto optim.loss_chunk_tokens={default.settings.chunk_tokens}):"
                       f" loss {loss['bytes'] / gib:.1f} -> {chunked / gib:.1f} GiB, "
                       f"total {(own['gpu_total'] - loss['bytes'] + chunked) / gib:.1f} GiB")
    if not own["fits"]:
        for row in rows:
            if row is not own and row["gpu_total"] < own["gpu_total"]:
                out.append(f"{row['scenario']}: {row['gpu_total'] / gib:.1f} GiB per GPU"
                           + (" (fits)" if row["fits"] else ""))
    fitting = own["largest_fitting_positions"]
    if config.data.packing:
        budget_tokens = fitting // PACKED_BUDGET_STEP * PACKED_BUDGET_STEP
        if budget_tokens < micro.positions:
            out.append(f"data.token_budget={budget_tokens} (rows of at most that many tokens; raise "
                       f"batch.grad_accum to keep the tokens per step)" if budget_tokens
                       else "not even a short packed row fits with these settings")
    elif fitting < micro.positions:
        width = micro.row_length
        rows_fit = fitting // width
        if rows_fit >= 1:
            accum = math.ceil(config.batch.per_device_batch_size * config.batch.grad_accum / rows_fit)
            out.append(f"batch.per_device_batch_size={rows_fit} batch.grad_accum={accum} (same global batch; "
                       "with the other settings unchanged)")
        else:
            out.append(f"one row of {width} tokens does not fit: data.max_length<={fitting} (longer records are "
                       "truncated) or data.packing=true with a smaller data.token_budget, or the settings above")
    return out
