"""One optimizer step: the batch contract, one micro-batch through the VLM to its loss, and `optimizer_step`.

The data pipeline produces `TrainBatch`es; the trainer calls, for each optimizer step,

    step = plan_micro_batches(micro_batches, config.optim.loss_normalisation)  # all-reduced across ranks
    for batch in micro_batches:
        forward_loss(model, settings, batch, step).loss.backward()

(`plan_micro_batches` is a collective under torch.distributed; see `loss` for how the loss is normalised and what
the caller must not do). DDP and DeepSpeed must wrap a module whose forward runs the whole computation:
`TrainingForward(vlm, settings)` is that module.

`forward_loss` embeds the prompt (`multimodal.embed_inputs`: image-token runs replaced by the images' visual token
blocks; a zero dummy crop keeps tower and projector in the graph for text-only batches, so every rank of a ZeRO-3
step joins the same parameter gathers), runs the language model with the batch's attention mask and position ids,
and computes the loss on the supervised positions only: the LM head runs on their hidden states alone, in chunks
above `HeadLossSettings.chunk_tokens` supervised tokens (`head_loss`: bounded memory, same loss and gradients).

`optimizer_step` is that recipe under accelerate (distribution is accelerate's business, set up from outside):
no DDP sync but for the last micro-batch, the loss never divided by the accumulation steps (DeepSpeed:
`scale_wrt_gas=False`), clipping, and the LR scheduler stepped here once per optimizer step (accelerate would step a
prepared scheduler once per process; it is not handed to DeepSpeed either). A micro-batch whose records were all
skipped trains on `empty_stand_in`, a zero-loss row, so every rank runs the same collectives.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mlcd_vl.data.problems import ProblemLog
from mlcd_vl.model.build import VLMSettings
from mlcd_vl.model.multimodal import ImageInput, embed_inputs
from mlcd_vl.model.pixels import dummy_pixels
from mlcd_vl.model.varlen import MASK_FREE_IMPLEMENTATIONS, cu_seqlens_from_positions, text_attention
from mlcd_vl.train.config import TrainConfig
from mlcd_vl.train.head_loss import HeadLossSettings, head_loss_sum
from mlcd_vl.train.loss import StepTokens, count_supervised, normalise, plan_step, shifted_targets
from mlcd_vl.train.metrics import StepCounts
from mlcd_vl.vocab import IGNORE_INDEX


class BatchError(ValueError):
    """A batch that breaks the contract; the message says which tensor and why."""


@dataclass
class TrainBatch:
    """One micro-batch, as the data pipeline hands it to the trainer.

    - input_ids [B, L] long: prompts with one `image_token_id` per visual token, right-padded.
    - labels [B, L] long: the token to predict at each position, -100 where nothing is supervised (prompt,
      image tokens, padding). The loss shifts them by one itself.
    - attention_mask: [B, L] padding mask (1 = token, 0 = padding) for padded rows, or [B, 1, L, L] for packed rows:
      an additive float mask (0 = may attend, large negative = may not) that is block-diagonal and causal, one block
      per sample (`data.packing.block_causal_mask`). A bool 4D mask (True = may attend) is converted. None only for
      packed rows on flash-attention or `sdpa_varlen` (`model.varlen`), which attend per sample within the boundaries
      `forward_loss` derives from position_ids (with plain SDPA or eager, restarting position ids alone does NOT
      stop attention across samples, so `forward_loss` refuses that).
    - position_ids [B, L] long or None: required for packed rows, restarting at 0 at every sample (a target whose
      position id is 0 starts a sample and is never trained on); None for padded rows.
    - images: every image of the batch in prompt order (row 0's images, then row 1's, ...), as many as the prompts
      have image-token runs.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    images: list[ImageInput] = field(default_factory=list)

    @classmethod
    def from_collated(cls, batch: dict) -> "TrainBatch":
        """From the data pipeline's collated dict (`data.collate` / `data.packing`); other keys are ignored."""
        return cls(batch["input_ids"], batch["labels"], batch.get("attention_mask"), batch.get("position_ids"),
                   list(batch.get("images") or []))

    @property
    def packed(self) -> bool:
        return self.attention_mask is None or self.attention_mask.dim() == 4

    def validate(self) -> None:
        if self.input_ids.dim() != 2:
            raise BatchError(f"input_ids must be [batch, length], got shape {tuple(self.input_ids.shape)}")
        shape = tuple(self.input_ids.shape)
        if tuple(self.labels.shape) != shape:
            raise BatchError(f"labels shape {tuple(self.labels.shape)} differs from input_ids {shape}")
        mask_shape = tuple(self.attention_mask.shape) if self.attention_mask is not None else None
        if mask_shape not in (None, shape, (shape[0], 1, shape[1], shape[1])):
            raise BatchError(f"attention_mask must be {shape} (padding) or {(shape[0], 1, shape[1], shape[1])} "
                             f"(packed), got {mask_shape}")
        if self.position_ids is not None and tuple(self.position_ids.shape) != shape:
            raise BatchError(f"position_ids shape {tuple(self.position_ids.shape)} differs from input_ids {shape}")
        if self.packed and self.position_ids is None:
            raise BatchError("packed rows (4D or no attention_mask) need per-sample position_ids")
        if not all(isinstance(image, ImageInput) for image in self.images):
            raise BatchError("images must be multimodal.ImageInput objects")

    def to(self, device: torch.device | str) -> "TrainBatch":
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        images = [ImageInput(move(image.pixels), image.size, image.mode) for image in self.images]
        return TrainBatch(move(self.input_ids), move(self.labels), move(self.attention_mask),
                          move(self.position_ids), images)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D attention mask in `dtype`: bool (True = attend) -> 0 / min; float masks are cast (clamped at min)."""
    minimum = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, minimum)
    return mask.to(dtype).clamp(min=minimum)


def sample_boundaries(batch: TrainBatch) -> dict:
    """flash-attention's varlen keywords for one packed row (samples start where the position id is 0)."""
    if batch.input_ids.shape[0] != 1:
        raise BatchError(f"packed rows without a mask must come one per micro-batch, got {batch.input_ids.shape[0]}")
    positions = batch.position_ids[0]
    if not positions.numel() or int(positions[0]) != 0:
        raise BatchError("a packed row must start a sample at its first token (position id 0)")
    cu = cu_seqlens_from_positions(positions)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def count_batch_supervised(batch: TrainBatch) -> int:
    """The supervised targets `forward_loss` will train on for this batch."""
    return count_supervised(batch.labels, batch.position_ids)


def plan_micro_batches(micro_batches: list[TrainBatch], mode: str = "global") -> StepTokens:
    """The step's normaliser from this rank's micro-batches (every rank must call it: it all-reduces)."""
    return plan_step([count_batch_supervised(batch) for batch in micro_batches], mode)


@dataclass
class LossOutput:
    loss: torch.Tensor  # normalised for this step: back-propagate as is
    supervised_tokens: int  # targets of this micro-batch
    loss_sum: torch.Tensor  # detached summed token loss (sum over the step / step.supervised = the step's mean)


def forward_loss(model: nn.Module, settings: VLMSettings, batch: TrainBatch, num_items_in_step: StepTokens,
                 head_loss: HeadLossSettings = HeadLossSettings()) -> LossOutput:
    """Embed, run the language model, and return the micro-batch loss normalised by `num_items_in_step`."""
    batch.validate()
    attention = text_attention(model)
    if batch.attention_mask is None and attention not in MASK_FREE_IMPLEMENTATIONS:
        raise BatchError(f"packed rows without a 4D block-diagonal mask leak attention across samples with "
                         f"{attention!r} attention; build the mask, or use one of {', '.join(MASK_FREE_IMPLEMENTATIONS)}")
    device = model.get_input_embeddings().weight.device
    batch = batch.to(device)
    dummy_crop = None if batch.images else dummy_pixels(settings.processor).to(device)
    embeds = embed_inputs(model, settings, batch.input_ids, batch.images, dummy_crop=dummy_crop)
    mask = batch.attention_mask
    if mask is not None and mask.dim() == 4:
        mask = additive_mask(mask, embeds.dtype)
    varlen = sample_boundaries(batch) if mask is None else {}
    outputs = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                         position_ids=batch.position_ids, use_cache=False, **varlen)
    targets = shifted_targets(batch.labels, batch.position_ids)
    supervised = targets != IGNORE_INDEX
    hidden = outputs.last_hidden_state[:, :-1][supervised]
    count = int(supervised.sum())
    # the gradient backward brings to loss_sum, in float32 (a chunked loss makes its gradients for it up front)
    grad_scale = float(normalise(torch.ones(()), count, num_items_in_step))
    loss_sum = head_loss_sum(model.lm_head, hidden, targets[supervised], head_loss, grad_scale)
    return LossOutput(normalise(loss_sum, count, num_items_in_step), count, loss_sum.detach())


class TrainingForward(nn.Module):
    """The VLM with `forward(batch, step) -> LossOutput`: the module DDP / DeepSpeed wrap for training.

    Its only submodule is `vlm`, so `module.vlm` is what gets saved.
    """

    def __init__(self, vlm: nn.Module, settings: VLMSettings, head_loss: HeadLossSettings = HeadLossSettings()) -> None:
        super().__init__()
        self.vlm = vlm
        self.settings = settings
        self.head_loss = head_loss

    def forward(self, batch: TrainBatch, step: StepTokens) -> LossOutput:
        return forward_loss(self.vlm, self.settings, batch, step, self.head_loss)


def empty_stand_in(pad_token_id: int) -> TrainBatch:
    """What a micro-batch whose records were all skipped trains on: two padding tokens, nothing supervised.

    `forward_loss` then runs the dummy crop through tower and projector and the whole language model, with a loss
    of exactly zero, so every rank does the same forward/backward (same collectives under DDP / ZeRO-3).
    """
    ids = torch.full((1, 2), pad_token_id, dtype=torch.long)
    return TrainBatch(ids, torch.full_like(ids, IGNORE_INDEX), torch.ones_like(ids), None, [])


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
