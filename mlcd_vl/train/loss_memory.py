"""Peak memory of the LM head + cross-entropy, full logits vs chunked: plain arithmetic (no torch).

One model for two readers: training's "auto" loss (`head_loss.choose_implementation`) takes the chunked path only
where it needs less memory than the full logits, and the plan (`plan/loss.py`) counts the same bytes.

- full logits: `LOSS_BYTES_PER_LOGIT` per supervised token x vocabulary entry (measured: the logits, their float32
  copy, the log-softmax and its gradient).
- chunked (`head_loss._loss_and_gradients`): the float32 [vocab, hidden] weight-gradient accumulator (when the head
  trains), then the larger of one chunk's float32 logits + log-softmax (`CHUNK_BYTES_PER_LOGIT`) and the
  accumulator's final cast to a low-precision head's dtype, plus the hidden states' gradient (all supervised
  positions), which the chunked path allocates in the forward pass.

Against bench/results/loss_memory_*_2026-12-02.md (Qwen2.5-7B's head, 1024-token chunks): 0.96-0.97x the measured
step peak in bf16 (3.32-3.52 GiB at 2k-32k tokens), 1.00x in fp32. The fixed accumulator is why chunking does not
pay below about 1.9k supervised tokens with that head trained in bf16, and pays from the first chunk when the head
is frozen.
"""

from __future__ import annotations

# Full logits, step peak per supervised token x vocabulary entry: 12.03-12.07 measured at 2k / 4k tokens, bf16 and
# fp32 (bench/results/loss_memory_*_2026-12-02.md; the first probe: 11.8)
LOSS_BYTES_PER_LOGIT = 12.05
CHUNK_BYTES_PER_LOGIT = 8  # a chunk's logits as float32 and their float32 log-softmax (reused for the gradient)


def loss_bytes(supervised_tokens: float, vocab: int) -> float:
    """Peak bytes of the full-logits loss on `supervised_tokens` positions."""
    return LOSS_BYTES_PER_LOGIT * supervised_tokens * vocab


def chunked_loss_bytes(supervised_tokens: float, vocab: int, hidden: int, chunk_tokens: int, *, weight_bytes: int,
                       activation_bytes: int, head_trains: bool, hidden_needs_grad: bool) -> float:
    """Peak bytes of the chunked linear + cross-entropy on `supervised_tokens` positions (see the module text);
    `weight_bytes` / `activation_bytes`: bytes of a head weight / a hidden-state element."""
    accumulator = 4.0 * vocab * hidden if head_trains else 0.0
    chunk = CHUNK_BYTES_PER_LOGIT * min(supervised_tokens, chunk_tokens) * vocab
    cast = weight_bytes * vocab * hidden if head_trains and weight_bytes != 4 else 0.0
    hidden_grad = activation_bytes * supervised_tokens * hidden if hidden_needs_grad else 0.0
    return accumulator + max(chunk, cast) + hidden_grad
