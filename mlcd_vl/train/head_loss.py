"""The LM head and the token cross-entropy with bounded memory: full, chunked, or Liger's fused kernel.

`forward_loss` hands over the last hidden states of the supervised positions only ([N, hidden]) and their targets.
Applying the head to all of them at once ("full") builds [N, vocab] logits, their float32 copy, the log-softmax and
its gradient: measured 11.8 bytes per (supervised token x vocab entry), 3.4 GiB at 2k tokens and about 55 GiB at
32k with Qwen2.5's 151936-entry vocabulary. "chunked" runs the head over `chunk_tokens` positions at a time and
computes each chunk's gradients (w.r.t. the hidden states, the head weight and bias) in the forward pass, as
Liger-Kernel's fused linear cross-entropy does, so only one chunk's logits exist at any time and nothing is
recomputed; backward only scales the stored gradients by the incoming gradient (the loss normalisation). The
weight gradient accumulates in float32 over the chunks and is cast to the weight's dtype once. Same loss and
gradients as "full" (float32: within 1e-6 relative, tested); fixed extra memory: the [vocab, hidden] weight gradient
is allocated in the forward pass (plus a float32 accumulator for a low-precision head) instead of in backward.

"liger" uses `liger_kernel`'s fused kernel (Triton, CUDA only) where it is installed and the tensors are on CUDA,
else falls back to "chunked" (same loss). "auto" (default) picks "chunked" when a micro-batch has more than
`chunk_tokens` supervised tokens and the chunked loss needs less memory than the full logits
(`loss_memory`: a trained head's float32 weight-gradient accumulator is a fixed cost, so with Qwen2.5-7B's head
trained in bf16 chunking pays from about 1.9k supervised tokens; a frozen head's from the first chunk), else
"full", which is faster. Only a plain `nn.Linear` head (no LoRA or other wrapper on it) can be chunked; "auto"
keeps "full" otherwise.

ZeRO-3: the head weight is a partitioned parameter, gathered by DeepSpeed's hooks around the head module's forward
and backward. The chunked and Liger losses therefore run AS the head's forward (`_run_as_forward`): DeepSpeed
gathers the weight before them and releases it after, and gathers it again in backward while the weight gradient
is accumulated (autograd copies it into the parameter's layout, which must then be whole).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mlcd_vl.train.loss import token_loss_sum
from mlcd_vl.train.loss_memory import chunked_loss_bytes, loss_bytes
from mlcd_vl.vocab import IGNORE_INDEX

LOSS_IMPLEMENTATIONS = ("auto", "full", "chunked", "liger")
DEFAULT_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class HeadLossSettings:
    """How `forward_loss` turns hidden states into the summed token loss (recipe: `optim.loss_impl`,
    `optim.loss_chunk_tokens`)."""

    impl: str = "auto"  # auto (chunked above chunk_tokens supervised tokens where it saves memory) | full | ...
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # positions per chunk, and the "auto" threshold

    def __post_init__(self) -> None:
        if self.impl not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss implementation {self.impl!r} is not one of {', '.join(LOSS_IMPLEMENTATIONS)}")
        if self.chunk_tokens <= 0:
            raise ValueError(f"loss chunk tokens must be positive, got {self.chunk_tokens}")

    @classmethod
    def from_config(cls, optim) -> "HeadLossSettings":
        return cls(optim.loss_impl, optim.loss_chunk_tokens)

    def describe(self, device_type: str) -> str:
        """One line for the run log: what the loss will do on `device_type` ("cuda" or "cpu")."""
        chunked = f"chunked linear cross-entropy ({self.chunk_tokens} positions per chunk)"
        if self.impl == "full":
            return "loss: full logits over all supervised positions (memory grows with vocab x supervised tokens)"
        if self.impl == "chunked":
            return f"loss: {chunked}"
        if self.impl == "liger":
            reason = liger_unavailable_reason(device_type)
            return "loss: Liger fused linear cross-entropy" if reason is None else f"loss: {chunked} ({reason})"
        return (f"loss: {chunked} for micro-batches above {self.chunk_tokens} supervised tokens where it needs less "
                "memory than full logits, full logits otherwise")


def liger_unavailable_reason(device_type: str) -> str | None:
    """Why Liger's fused kernel cannot run here, or None when it can."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if device_type != "cuda":
        return "Liger's Triton kernels need CUDA"
    return None


@dataclass(frozen=True)
class HeadInputs:
    """What the loss's memory depends on besides the head's shape: bytes of a head weight as the loss sees it (4
    under DDP's autocast, the training dtype's under DeepSpeed), of a hidden-state element, and which of the two
    need gradients. `of` reads them from the tensors at hand; the plan states them for a recipe."""

    weight_bytes: int = 4
    hidden_bytes: int = 4
    head_trains: bool = True
    hidden_needs_grad: bool = True

    @classmethod
    def of(cls, head: nn.Module, hidden: torch.Tensor) -> "HeadInputs":
        weight = getattr(head, "weight", None)
        if weight is None:
            return cls(hidden_bytes=hidden.element_size(), hidden_needs_grad=hidden.requires_grad)
        return cls(weight.element_size(), hidden.element_size(), weight.requires_grad, hidden.requires_grad)


def loss_peak_bytes(implementation: str, supervised: float, vocab: int, width: int, chunk_tokens: int,
                    inputs: HeadInputs) -> float:
    """Peak bytes of the loss on `supervised` targets with a [vocab, width] head: the full logits, or the chunked
    loss ("chunked" or "liger", counted alike), by `loss_memory`'s arithmetic."""
    if implementation == "full":
        return loss_bytes(supervised, vocab)
    return chunked_loss_bytes(supervised, vocab, width, chunk_tokens, weight_bytes=inputs.weight_bytes,
                              activation_bytes=inputs.hidden_bytes, head_trains=inputs.head_trains,
                              hidden_needs_grad=inputs.hidden_needs_grad)


def chunked_saves_memory(settings: HeadLossSettings, supervised: int, head: nn.Linear, inputs: HeadInputs) -> bool:
    """Whether the chunked loss's peak is below the full logits' for `supervised` targets."""
    shape = (head.out_features, head.in_features)  # nn.Linear's own record: right under ZeRO-3 partitioning
    return (loss_peak_bytes("chunked", supervised, *shape, settings.chunk_tokens, inputs)
            < loss_peak_bytes("full", supervised, *shape, settings.chunk_tokens, inputs))


def choose_implementation(settings: HeadLossSettings, supervised: int, head: nn.Module, device_type: str,
                          inputs: HeadInputs = HeadInputs()) -> str:
    """"full", "chunked" or "liger" for a micro-batch with `supervised` targets; raises ValueError when a chunked or
    Liger loss is asked for but the head is not a plain nn.Linear."""
    if settings.impl == "full":
        return "full"
    plain = type(head) is nn.Linear
    if settings.impl == "auto":
        chunk = plain and supervised > settings.chunk_tokens and chunked_saves_memory(settings, supervised, head,
                                                                                      inputs)
        return "chunked" if chunk else "full"
    if not plain:
        raise ValueError(f"optim.loss_impl={settings.impl} needs a plain nn.Linear lm_head, got "
                         f"{type(head).__name__} (LoRA or another wrapper on it?); use auto or full")
    if settings.impl == "liger" and liger_unavailable_reason(device_type) is None:
        return "liger"
    return "chunked"


def head_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  settings: HeadLossSettings = HeadLossSettings(), grad_scale: float = 1.0) -> torch.Tensor:
    """Summed float32 cross-entropy of `head(hidden)` [N, vocab] against `targets` [N] (IGNORE_INDEX skipped).

    `grad_scale`: the factor the caller will multiply the sum by before backward (see
    `chunked_linear_cross_entropy`); any value gives correct gradients, the right one gives the full path's."""
    impl = choose_implementation(settings, int(targets.numel()), head, hidden.device.type,
                                 HeadInputs.of(head, hidden))
    if impl == "full":
        return token_loss_sum(head(hidden), targets)
    if impl == "liger":
        def loss(states, labels):
            return liger_loss_sum(states, head.weight, head.bias, labels)
    else:
        def loss(states, labels):
            return chunked_linear_cross_entropy(states, head.weight, head.bias, labels, settings.chunk_tokens,
                                                grad_scale)
    return _run_as_forward(head, loss, hidden, targets)


def _run_as_forward(module: nn.Module, function: Callable, *args):
    """`function(*args)` called as `module`'s forward, so the hooks on the module wrap it (DeepSpeed ZeRO-3: its
    partitioned parameters are gathered for the call and again for its backward, and released after each)."""
    own = module.__dict__.get("forward")  # an instance-level forward someone else set, restored after
    module.forward = function
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


# ----------------------------------------------------------------------------------------------------------------
# Chunked linear + cross-entropy, gradients in the forward pass
# ----------------------------------------------------------------------------------------------------------------


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                 grad_scale: float = 1.0) -> torch.Tensor:
    """`token_loss_sum(F.linear(hidden, weight, bias), targets)` without ever holding more than `chunk_tokens`
    rows of logits; differentiable w.r.t. hidden, weight and bias.

    `grad_scale`: the gradient backward will most likely bring (the loss normalisation factor). The gradients are
    made for it in the forward pass, with the full path's arithmetic; backward multiplies them by
    incoming / grad_scale, which is exactly 1 when the guess holds (any other incoming gradient is still exact up to
    one rounding)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if not grad_scale > 0:
        raise ValueError(f"grad_scale must be positive, got {grad_scale}")
    inputs = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, grad_scale)
    return _loss_and_gradients(hidden, weight, bias, targets, chunk_tokens, (False, False, False), grad_scale)[0]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, grad_scale):
        needs = tuple(ctx.needs_input_grad[:3])
        loss, *grads = _loss_and_gradients(hidden, weight, bias, targets, chunk_tokens, needs, grad_scale)
        ctx.gradients, ctx.grad_scale = grads, grad_scale  # not saved_tensors: neither inputs nor outputs
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.gradients is None:
            raise RuntimeError("the chunked cross-entropy computes its gradients once: backward through it twice "
                               "(retain_graph) is not supported")
        grads, ctx.gradients = ctx.gradients, None
        # the stored gradients are d(grad_scale * loss)/dx; in place, they are used once
        factor = grad_loss.float() / ctx.grad_scale
        scaled = [_scale_(g, factor) if g is not None else None for g in grads]
        return (*scaled, None, None, None)


def _loss_and_gradients(hidden, weight, bias, targets, chunk_tokens, needs, grad_scale):
    """(float32 loss sum, and the gradients of grad_scale x loss sum w.r.t. hidden, weight and bias); a gradient is
    None where `needs` says it is not wanted."""
    need_hidden, need_weight, need_bias = needs
    any_grad = need_hidden or need_weight or need_bias
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    # float32 accumulator; for a float32 head it IS the gradient (no copy), else cast once at the end
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        chunk, chunk_targets = hidden[rows], targets[rows]
        # [c, vocab] float32 log-probabilities, computed as F.cross_entropy does (log_softmax, then pick)
        log_probs = torch.log_softmax(F.linear(chunk, weight, bias).float(), dim=-1)
        valid = chunk_targets != IGNORE_INDEX
        safe_targets = torch.where(valid, chunk_targets, 0)[:, None]
        target_log_probs = log_probs.gather(1, safe_targets).squeeze(1)
        loss -= torch.where(valid, target_log_probs, 0.0).sum()
        if not any_grad:
            continue
        # d(s x sum of -log softmax[target]) / d logits = s x softmax - s x one_hot(target), zero on ignored rows;
        # in place, rounded as F.cross_entropy's backward rounds it
        grad_logits = log_probs.exp_()
        if grad_scale != 1.0:
            grad_logits.mul_(grad_scale)
        grad_logits.scatter_add_(1, safe_targets, torch.full_like(target_log_probs, -grad_scale)[:, None])
        grad_logits.mul_(valid[:, None])
        if need_bias:
            grad_bias += grad_logits.sum(0)
        grad_logits = grad_logits.to(weight.dtype)
        if need_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
        if need_weight:
            _accumulate_weight_gradient(grad_weight, grad_logits, chunk)
        del log_probs, grad_logits
    if need_weight:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


ROW_SLICES = 8  # low-precision [vocab, hidden] updates go in row slices: temporaries of 1/8 of the weight


def _row_slices(rows: int) -> tuple[range, int]:
    step = -(-rows // ROW_SLICES)
    return range(0, rows, max(step, 1)), max(step, 1)


def _accumulate_weight_gradient(accumulator: torch.Tensor, grad_logits: torch.Tensor, chunk: torch.Tensor) -> None:
    """accumulator (float32) += grad_logits^T @ chunk without a full-size temporary."""
    if grad_logits.dtype == torch.float32:
        accumulator.addmm_(grad_logits.t(), chunk)
        return
    starts, step = _row_slices(accumulator.shape[0])
    for start in starts:
        accumulator[start:start + step] += grad_logits[:, start:start + step].t() @ chunk


def _scale_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale in place, the product rounded once to grad's dtype (float32 arithmetic)."""
    if grad.dtype == torch.float32 or grad.dim() == 0:
        return grad.mul_(scale)
    starts, step = _row_slices(grad.shape[0])
    for start in starts:
        part = grad[start:start + step]
        part.copy_(part.float().mul_(scale))
    return grad


# ----------------------------------------------------------------------------------------------------------------
# Liger-Kernel (CUDA)
# ----------------------------------------------------------------------------------------------------------------


def liger_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy, summed (its kernel accumulates the weight gradient in float32 where the
    installed version lets us ask)."""
    import inspect

    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    options = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
        options["accum_dtype"] = torch.float32
    return LigerFusedLinearCrossEntropyLoss(**options)(weight, hidden, targets, bias).float()
