"""`sdpa_varlen`: packed rows attend per sample on PyTorch SDPA, the way flash-attention's varlen kernel does.

A packed row holds several samples one after another. SDPA with a block-diagonal 4D mask isolates them correctly
but still computes the whole T x T square (and needs the O(T^2) mask): on CPU that was 5.6x the attention of the
samples alone and half of a packed training step (bench/results/train_throughput_*). This attention instead runs
causal SDPA on each sample's slice, bounded by `cu_seq_lens_q` (transformers' flash-attention keyword, which
`train.step.forward_loss` passes for packed rows), so the cost is the sum of the per-sample squares and no mask is
built at all. It is registered with transformers' `AttentionInterface` under `VARLEN_ATTENTION`, so any
AttentionInterface model (Qwen2 included) can use it: `model.set_attn_implementation({"text_config": ...})`.

Without `cu_seq_lens_q` it is ordinary SDPA: its mask function is flash-attention's (None, or the 2D padding mask),
which this module expands to a causal 4D mask, so padded batches, evaluation and cached generation keep working.
It is a CPU / no-flash fallback: on a GPU with flash-attn installed, `flash_attention_2` does the same in one kernel.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

VARLEN_ATTENTION = "sdpa_varlen"
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
# Attention that isolates packed samples from their boundaries alone, with no 4D mask.
MASK_FREE_IMPLEMENTATIONS = FLASH_IMPLEMENTATIONS + (VARLEN_ATTENTION,)


def padding_to_causal_mask(padding: torch.Tensor, q_length: int) -> torch.Tensor:
    """[B, kv] padding mask (True = token) -> [B, 1, q, kv] bool mask, causal with the queries at the end of the keys.

    A query row with no key to attend to (a left-padding position) attends to every key instead: its output is never
    used, and a fully blocked row would make SDPA return NaN, which would reach real tokens' gradients as 0 * NaN.
    """
    kv_length = padding.shape[-1]
    causal = torch.ones(q_length, kv_length, dtype=torch.bool, device=padding.device).tril(kv_length - q_length)
    allowed = causal[None, None] & padding.bool()[:, None, None, :]
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def cu_seqlens_from_positions(positions: torch.Tensor) -> torch.Tensor:
    """[0, sample starts..., length] (int32) of one row whose position ids restart at 0 at every sample; the first
    token always starts a sample. The one place sample boundaries are read from position ids."""
    starts = (positions[1:] == 0).nonzero().flatten() + 1
    return torch.cat([starts.new_zeros(1), starts, starts.new_tensor([positions.shape[-1]])]).to(torch.int32)


def sample_bounds(cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None, rows: int,
                  length: int) -> list[list[int]] | None:
    """Per row, the sample boundaries [0, ..., length] of a packed batch; None when no row is packed.

    From `cu_seq_lens_q` (one row), else from position ids that restart at 0 inside a row (what transformers'
    flash-attention path accepts too, so a caller passing only position ids is isolated the same way).
    """
    if cu_seq_lens is not None:
        bounds = [int(b) for b in cu_seq_lens.tolist()]
        if rows != 1 or bounds[0] != 0 or bounds[-1] != length:
            raise ValueError(f"{VARLEN_ATTENTION}: cu_seq_lens_q {bounds[:3]}...{bounds[-1:]} must split one "
                             f"packed row of {length} tokens (got {rows} rows)")
        return [bounds]
    if position_ids is None or position_ids.shape[-1] != length:
        return None
    per_row = [cu_seqlens_from_positions(row).tolist() for row in position_ids.reshape(-1, length)]
    if all(len(bounds) == 2 for bounds in per_row):  # one sample per row: ordinary causal attention
        return None
    return per_row if len(per_row) == rows else per_row * rows  # position ids broadcast over the batch


def sdpa_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: query [B, H, q, D], key/value [B, Hkv, kv, D] -> ([B, q, H, D], None)."""
    if kwargs.get("sliding_window"):
        raise NotImplementedError(f"{VARLEN_ATTENTION} has no sliding-window attention; use sdpa or flash_attention_2")
    rows, length = query.shape[0], query.shape[2]
    packed = None
    if attention_mask is None and key.shape[2] == length:  # no cache, no padding: the only case packing occurs
        packed = sample_bounds(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), rows, length)
    elif kwargs.get("cu_seq_lens_q") is not None:
        raise ValueError(f"{VARLEN_ATTENTION}: packed rows (cu_seq_lens_q) take no padding mask and no cache")
    if packed is None:
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = padding_to_causal_mask(attention_mask, length)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal)
    outputs = []
    for row, bounds in enumerate(packed):
        pick = slice(row, row + 1)
        outputs.append(torch.cat([
            sdpa_attention_forward(module, query[pick, :, start:end], key[pick, :, start:end],
                                   value[pick, :, start:end], None, dropout=dropout, scaling=scaling,
                                   is_causal=True)[0]
            for start, end in zip(bounds[:-1], bounds[1:]) if end > start], dim=1))
    return torch.cat(outputs, dim=0), None


def composite_attention(requested: str, packing: bool) -> str | dict:
    """What to pass to the composite's `set_attn_implementation` for a training run.

    Packed rows on plain SDPA get `sdpa_varlen` (same results as the block mask, without its T x T cost); the tower
    never sees packed rows, so `sdpa_varlen` only ever goes to the language model.
    """
    if requested == VARLEN_ATTENTION or (packing and requested == "sdpa"):
        return {"": "sdpa", "text_config": VARLEN_ATTENTION}
    return requested


def text_attention(model) -> str:
    """The language model's attention implementation of a composite (or of a bare LM)."""
    config = getattr(model.config, "text_config", None) or model.config
    return config._attn_implementation or ""


AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen_attention)
# Flash-attention's mask semantics: no mask for unpadded rows, the 2D padding mask otherwise (no T x T tensor).
AttentionMaskInterface.register(VARLEN_ATTENTION, flash_attention_mask)
