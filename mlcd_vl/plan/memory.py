"""The memory model of a training run: every term, as plain arithmetic on counts (no torch here).

Per GPU (bytes per rank; Psi = all parameters, Psi_t = trainable ones, N = data-parallel ranks, w = bytes of a
weight in the training dtype, g = bytes of a gradient: DeepSpeed accumulates in the model dtype by default):

| ZeRO stage          | parameters     | gradients               | optimizer states (master + Adam m, v)           |
|---------------------|----------------|-------------------------|-------------------------------------------------|
| 0 (DDP, accelerate) | 4 Psi (fp32)   | 4 Psi_t (x2 if N > 1)   | 8 Psi_t (torch AdamW on the fp32 weights)       |
| 1                   | w Psi          | g Psi_t                 | (4 + 8) Psi_t / N                               |
| 2                   | w Psi          | g Psi_t / N (*)         | (4 + 8) Psi_t / N                               |
| 3                   | w Psi / N (+ small tensors whole) | g Psi_t / N | (4 + 8) Psi_t / N                        |

from DeepSpeed 0.19's code and measured on CPU (bench/plan_validation.py): ZeRO-1/2/3 keep an fp32 master copy of
their partition even when the weights are fp32; (*) ZeRO-2's gradient partition holds every tensor that overlaps
it whole, so a rank whose partition starts inside a large tensor (an embedding) holds more (computed per rank
from the optimizer groups, the worst rank reported); ZeRO-3 keeps tensors of <= `stage3_param_persistence_threshold`
elements whole on every rank; DDP without `gradient_as_bucket_view` holds its reduction buckets beside `.grad`.
Offload (`offload_optimizer` / `offload_param` to cpu, configs/deepspeed/zero3_offload.json) moves the optimizer
states (and ZeRO-3's gradient partitions) / the parameter partitions to host memory. Buffers: the gradient
reduction bucket(s), ZeRO-3's gathered working set (bounded by `stage3_max_live_parameters` and the largest module,
plus the prefetch bucket), and under DDP with bf16 autocast the low-precision weight copies saved for backward.

Activations per token (bytes, e = activation element size, h / kv / i = hidden, key-value and MLP widths): what
autograd saves, counted op by op for transformers' Qwen2 decoder layer and MLCD / CLIP encoder layer with SDPA
(flash / memory-efficient kernels, no T x T scores). Tensors saved only for weight gradients are left out where the
weights are frozen (autograd saves an input only when the other operand needs its gradient):

    Qwen2 layer:  always 2 x 4h (RMSNorm's fp32 upcast) + e(2h + 2kv) (SDPA q, k, v, out) + 3e i (SiLU gate)
                  trainable + e(5h + i) (norm outputs, the inputs of q/k/v, o, gate/up and down projections)
    tower layer:  always e(6h) (LayerNorm inputs, SDPA q, k, v, out) + e i (GELU input)
                  trainable + e(3h + i), + 16h for MLCD (its 2D RoPE saves q, k and their rotations in fp32)
    eager attention: + (4 + e) heads x row length (softmax probabilities, fp32 and cast)

With gradient checkpointing (every layer, non-reentrant) a layer keeps only its input (e h) and one layer is
recomputed at a time during backward. A frozen tower with nothing trainable before it saves nothing.

The loss (`optim.loss_impl`, decided per micro-batch by training's own `head_loss.choose_implementation`):
full logits or the chunked linear + cross-entropy, counted by `train/loss_memory.py` (the same arithmetic "auto"
uses to choose). Liger's fused kernel is counted as the chunked loss (it also accumulates the weight gradient in
float32 and holds a chunk of logits at a time).

Host, per node: every rank builds the model (whole in fp32 except under ZeRO-3's partitioned build,
`HOST_BUILD_BYTES_PER_PARAM_*`, measured), keeps the record index and length table (`HOST_BYTES_PER_RECORD`,
measured), holds what offload puts there, and ZeRO-3's final save streams one shard at a time on the main process
(`HOST_SAVE_SHARD_BYTES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlcd_vl.train.loss_memory import (  # noqa: F401  (the plan's loss terms, shared with training)
    CHUNK_BYTES_PER_LOGIT, LOSS_BYTES_PER_LOGIT, chunked_loss_bytes, loss_bytes)

GIB = 1024**3
NORM_UPCAST_BYTES = 4  # Qwen2RMSNorm computes in fp32 whatever the activation dtype
ROPE_FP32_SAVED = 4  # MLCD's rotary embedding: q, k, rotate_half(q), rotate_half(k) in fp32
# The model built whole in fp32 on every rank before DeepSpeed partitions it (issue 14, measured on CPU with a
# 188M model, 1 and 2 processes): ZeRO-1/2, DDP, and ZeRO-3 with model.sharded_init=false. ZeRO-3's default
# partitioned build holds the rank's partition (0.50x the model per rank at 2 ranks, measured) plus one tensor.
HOST_BUILD_BYTES_PER_PARAM_RESIDENT = 4.1
HOST_BUILD_BYTES_PER_PARAM_PEAK = 6.1
# ZeRO-3's final save streams shards (train.zero.save_streamed): the main process holds one shard of at most
# SHARD_SIZE plus the parameter being gathered (bench/results/zero3_memory_*: +113 MiB at 100 MB shards, where
# consolidating the fp32 state first cost +1,717 MiB, 2.0x the fp32 model).
HOST_SAVE_SHARD_BYTES = 2e9  # train.zero.SHARD_SIZE
# Records read through the cached JSON index (data/json_index.py): each rank keeps the offsets and the length
# table, ~75 MiB per 1M records (bench/results/data_startup_*: USS added per rank, cached index); the data file
# itself is memory-mapped page cache shared by the node's ranks, not counted per rank.
HOST_BYTES_PER_RECORD = 75 * 2**20 / 1e6


@dataclass(frozen=True)
class Precision:
    """The training dtype on the GPU: `bf16`, `fp16` or `fp32`."""

    name: str

    @property
    def low(self) -> bool:
        return self.name in ("bf16", "fp16")

    @property
    def weight_bytes(self) -> int:
        return 2 if self.low else 4

    @property
    def activation_bytes(self) -> int:
        return 2 if self.low else 4


@dataclass(frozen=True)
class Sharding:
    """How parameters, gradients and optimizer states are split: a ZeRO stage (0 = plain DDP) and its settings."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int = 0  # elements
    prefetch_bucket: int = 0  # elements (ZeRO-3)
    max_live_parameters: int = 10**9  # elements (ZeRO-3)
    persistence_threshold: int = 0  # elements (ZeRO-3)
    overlap_comm: bool = False

    @property
    def label(self) -> str:
        name = "DDP (no ZeRO)" if self.stage == 0 else f"ZeRO-{self.stage}"
        offload = [what for what, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return name + (f" + offload {'+'.join(offload)}" if offload else "")

    @classmethod
    def from_deepspeed(cls, ds: dict | None) -> Sharding:
        """From a DeepSpeed config with its "auto" values filled (`train.zero.deepspeed_config`); None: DDP."""
        if not ds:
            return cls(stage=0)
        zero = ds.get("zero_optimization", {})

        def number(key: str, default: float) -> int:
            value = zero.get(key, default)
            return int(float(value)) if value not in (None, "auto") else int(default)

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") not in ("none", None)

        return cls(stage=int(zero.get("stage", 0)), offload_optimizer=offloaded("offload_optimizer"),
                   offload_params=offloaded("offload_param"), reduce_bucket=number("reduce_bucket_size", 5e8),
                   prefetch_bucket=number("stage3_prefetch_bucket_size", 5e7),
                   max_live_parameters=number("stage3_max_live_parameters", 1e9),
                   persistence_threshold=number("stage3_param_persistence_threshold", 1e5),
                   overlap_comm=bool(zero.get("overlap_comm", False)))


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class StateMemory:
    """Parameters, gradients, optimizer states and buffers of one rank: on its GPU and in host memory.

    Terms hold the worst rank; `per_rank` lists the terms that differ between ranks (ZeRO-2's gradient partition
    holds every tensor that overlaps it, so the ranks at large tensors hold more)."""

    gpu: list[Term] = field(default_factory=list)
    host: list[Term] = field(default_factory=list)
    per_rank: dict[str, list[float]] = field(default_factory=dict)

    def gpu_bytes(self, name: str | None = None) -> float:
        return sum(t.bytes for t in self.gpu if name is None or t.name == name)

    def host_bytes(self) -> float:
        return sum(t.bytes for t in self.host)


def zero3_partition(numels: tuple[int, ...], world: int, persistence_threshold: int) -> tuple[int, int]:
    """(elements this rank holds of the partitioned tensors, elements of the persistent ones held whole)."""
    partitioned = sum(math.ceil(n / world) for n in numels if n > persistence_threshold)
    persistent = sum(n for n in numels if n <= persistence_threshold)
    return partitioned, persistent


def zero12_partition(groups: tuple[tuple[int, ...], ...], world: int) -> tuple[int, list[int]]:
    """ZeRO-1/2 (`stage_1_and_2.py`): each optimizer group flattened in order, padded to a multiple of 2 x world and
    cut into equal partitions. Returns (partition elements per rank, and per rank the elements of every tensor that
    overlaps its partition: the size of ZeRO-2's `grads_in_partition`)."""
    partition, overlapping = 0, [0] * world
    for numels in groups:
        alignment = 2 * world
        size = math.ceil(sum(numels) / alignment) * alignment // world
        partition += size
        for rank in range(world):
            start, end, offset = rank * size, (rank + 1) * size, 0
            for numel in numels:
                if start <= offset < end or offset < start < offset + numel:
                    overlapping[rank] += numel
                offset += numel
    return partition, overlapping


def state_memory(params: int, trainable: int, precision: Precision, sharding: Sharding, world: int, *,
                 param_numels: tuple[int, ...] = (), optimizer_groups: tuple[tuple[int, ...], ...] = (),
                 largest_module: int = 0) -> StateMemory:
    """The per-rank bytes of weights, gradients and optimizer states (module docstring's table).

    `param_numels`: every parameter tensor's size; `optimizer_groups`: the trainable tensors' sizes per optimizer
    group, in order (`optim.build_param_groups`); without them the model is one tensor / one group."""
    stage, n = sharding.stage, world
    w = precision.weight_bytes
    g = w  # DeepSpeed's grad_accum_dtype defaults to the model dtype
    groups = optimizer_groups or ((trainable,),)
    out = StateMemory()
    if stage == 0:
        out.gpu += [Term("parameters", 4.0 * params, "fp32 weights (autocast computes in low precision)"),
                    Term("gradients", 4.0 * trainable * (2 if n > 1 else 1),
                         "fp32 .grad" + (" + DDP reduction buckets" if n > 1 else "")),
                    Term("optimizer states", 8.0 * trainable, "AdamW m, v (fp32)")]
        if precision.low:
            out.gpu.append(Term("buffers", 2.0 * params, "autocast low-precision weight copies saved for backward"))
        return out
    adam_note = "fp32 master + AdamW m, v (fp32), partitioned"
    if stage < 3:
        partition, overlapping = zero12_partition(groups, n)
        optimizer = Term("optimizer states", 12.0 * partition, adam_note)
        if stage == 2:
            out.per_rank["gradients"] = [float(g * elements) for elements in overlapping]
            grads = Term("gradients", max(out.per_rank["gradients"]), "partition (whole tensors that overlap it)")
        else:
            grads = Term("gradients", g * trainable, "whole (reduced at the step)")
        buckets = Term("buffers", g * sharding.reduce_bucket * (2 if sharding.overlap_comm else 1),
                       "gradient reduction bucket(s), during backward")
        out.gpu += [Term("parameters", w * params, "whole on every rank"), grads, buckets]
        (out.host if sharding.offload_optimizer else out.gpu).append(optimizer)
        return out
    partitioned, persistent = zero3_partition(param_numels or (params,), n, sharding.persistence_threshold)
    trainable_partition = sum(zero3_partition(numels, n, -1)[0] for numels in groups)
    weights = Term("parameters", w * partitioned, "partition of every weight")
    grads = Term("gradients", g * trainable_partition, "partition (reduce-scattered)")
    optimizer = Term("optimizer states", 12.0 * trainable_partition, adam_note)
    gathered = max(largest_module, min(sharding.max_live_parameters, params)) + sharding.prefetch_bucket
    whole = f"tensors of <= {sharding.persistence_threshold:,} elements, whole"
    out.gpu += [Term("parameters", w * persistent, whole),
                Term("buffers", g * sharding.reduce_bucket, "gradient reduction bucket"),
                Term("buffers", w * gathered, "gathered weights in use, at most (max live parameters + prefetch)")]
    (out.host if sharding.offload_params else out.gpu).append(weights)
    if sharding.offload_optimizer:
        fp32_grads = 4.0 * min(trainable_partition, 10**9)  # fp32 copy per sub-group (sub_group_size 1e9)
        out.host += [grads, optimizer, Term("gradients", fp32_grads, "fp32 copy for the CPU optimizer step")]
    else:
        out.gpu += [grads, optimizer]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------


def llm_layer_bytes(hidden: int, kv_dim: int, intermediate: int, e: int, *, trainable: bool,
                    eager_heads: int = 0, row_length: int = 0, gqa_expanded: bool = False) -> float:
    """Bytes one Qwen2 decoder layer saves per token for backward (module docstring)."""
    kv = hidden if gqa_expanded else kv_dim  # padded SDPA batches repeat k, v to every query head
    saved = 2 * NORM_UPCAST_BYTES * hidden + e * (2 * hidden + 2 * kv) + 3 * e * intermediate
    if trainable:
        saved += e * (5 * hidden + intermediate)
    if eager_heads:
        saved += (4 + e) * eager_heads * row_length
    return float(saved)


def tower_layer_bytes(hidden: int, intermediate: int, e: int, *, trainable: bool, rotary: bool = False) -> float:
    """Bytes one MLCD / CLIP encoder layer saves per token for backward.

    MLCD's 2D RoPE runs in fp32 with cos / sin that carry the trainable `class_pos_emb`, so a training tower also
    saves q, k and their rotations in fp32 (`ROPE_FP32_SAVED` x 4 bytes x hidden, measured by saved-tensor hooks)."""
    saved = 6 * e * hidden + e * intermediate
    if trainable:
        saved += e * (3 * hidden + intermediate) + (ROPE_FP32_SAVED * 4 * hidden if rotary else 0)
    return float(saved)


def stack_bytes(layer_bytes: float, layers: int, hidden: int, e: int, checkpointing: bool) -> float:
    """Per token through `layers` layers: all saved tensors, or each layer's input plus one recomputed layer."""
    if not checkpointing:
        return layer_bytes * layers
    return e * hidden * layers + layer_bytes


@dataclass(frozen=True)
class ActivationRates:
    """Bytes per LLM position and per crop (through the tower and the projector)."""

    per_position: float
    per_crop: float


def activation_rates(llm, tower, projector_in: int, projector_out: int, e: int, *, llm_trainable: bool,
                     tower_trainable: bool, projector_trainable: bool, checkpointing: bool, eager: bool = False,
                     row_length: int = 0, gqa_expanded: bool = False) -> ActivationRates:
    """The activation rates of a composite (shapes from `model_size`) in one configuration."""
    layer = llm_layer_bytes(llm.hidden, llm.kv_dim, llm.intermediate, e, trainable=llm_trainable,
                            eager_heads=llm.heads if eager else 0, row_length=row_length, gqa_expanded=gqa_expanded)
    final_norm = NORM_UPCAST_BYTES * llm.hidden + (e * llm.hidden if llm_trainable else 0)
    per_position = stack_bytes(layer, llm.layers, llm.hidden, e, checkpointing) + final_norm
    per_crop = 0.0
    if tower_trainable:
        tower_layer = tower_layer_bytes(tower.hidden, tower.intermediate, e, trainable=True, rotary=tower.rotary)
        per_crop = tower.tokens_per_crop * stack_bytes(tower_layer, tower.layers_used, tower.hidden, e,
                                                       checkpointing)
    # The projector runs on every crop's patch features: its GELU input always, the inputs of both linears when
    # it trains (nothing upstream of it needs a gradient in stage 1, where the tower is frozen).
    patches = (tower.crop_size // tower.patch_size) ** 2
    per_patch = e * projector_out + (e * (projector_in + projector_out) if projector_trainable else 0)
    return ActivationRates(per_position, per_crop + patches * per_patch)
