"""The plan's loss term, decided as training decides it.

Training runs the LM head + cross-entropy through `train.head_loss`: the recipe's `optim.loss_impl` (auto | full |
chunked | liger) and `optim.loss_chunk_tokens` pick, per micro-batch, full logits or the chunked loss
(`head_loss.choose_implementation`, called here on the recipe's own meta-device head, so a LoRA-wrapped head and a
bad setting behave as in training). The bytes of each path are training's own (`head_loss.loss_peak_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

DEVICE_TYPE = "cuda"  # the plan is for GPUs: Liger counts as available where liger-kernel is installed


@dataclass(frozen=True)
class LossModel:
    """The LM head and loss of a recipe: its settings, its head and what needs a gradient."""

    settings: object  # head_loss.HeadLossSettings
    head: object  # the recipe's lm_head module (meta device)
    vocab: int
    hidden: int
    activation_bytes: int
    head_trains: bool
    hidden_needs_grad: bool

    @classmethod
    def of(cls, config, shape, activation_bytes: int) -> LossModel:
        from mlcd_vl.train.head_loss import HeadLossSettings

        return cls(HeadLossSettings.from_config(config.optim), shape.lm_head, shape.llm.vocab, shape.llm.hidden,
                   activation_bytes, head_trains=shape.head_trainable > 0,
                   hidden_needs_grad=shape.trainable_params > shape.head_trainable)

    def with_settings(self, impl: str, chunk_tokens: int | None = None) -> LossModel:
        """The same head under other loss settings (`chunk_tokens` None: training's default)."""
        from mlcd_vl.train.head_loss import DEFAULT_CHUNK_TOKENS, HeadLossSettings

        return replace(self, settings=HeadLossSettings(impl, chunk_tokens or DEFAULT_CHUNK_TOKENS))

    def inputs(self, weight_bytes: int):
        """The head's `head_loss.HeadInputs` with a weight of `weight_bytes` (4 under DDP's autocast, the training
        dtype's under DeepSpeed)."""
        from mlcd_vl.train.head_loss import HeadInputs

        return HeadInputs(weight_bytes, self.activation_bytes, self.head_trains, self.hidden_needs_grad)

    def implementation(self, supervised: float, weight_bytes: int) -> str:
        """"full", "chunked" or "liger" for a micro-batch of `supervised` targets with a head of `weight_bytes` per
        weight: training's own decision."""
        from mlcd_vl.train.head_loss import choose_implementation

        return choose_implementation(self.settings, int(supervised), self.head, DEVICE_TYPE, self.inputs(weight_bytes))

    def bytes_at(self, supervised: float, weight_bytes: int, implementation: str | None = None) -> float:
        """Peak bytes for a micro-batch of `supervised` targets with a head of `weight_bytes` per weight, by
        training's choice or the one given (training's own arithmetic, `head_loss.loss_peak_bytes`)."""
        from mlcd_vl.train.head_loss import loss_peak_bytes

        return loss_peak_bytes(implementation or self.implementation(supervised, weight_bytes), supervised,
                               self.vocab, self.hidden, self.settings.chunk_tokens, self.inputs(weight_bytes))

    def peak(self, supervised: float, weight_bytes: int) -> float:
        """The most any micro-batch of up to `supervised` targets needs. Each path grows with the targets, but "auto"
        switches paths at `chunk_tokens` (where chunking saves memory), so the full logits just below the threshold
        can cost more than the chunked loss above it (a large `loss_chunk_tokens`): both ends count."""
        candidates = [supervised]
        if self.settings.impl == "auto" and supervised > self.settings.chunk_tokens:
            candidates.append(self.settings.chunk_tokens)
        return max(self.bytes_at(n, weight_bytes) for n in candidates)

    def describe(self, supervised: float, weight_bytes: int) -> str:
        implementation = self.implementation(supervised, weight_bytes)
        setting = f"optim.loss_impl={self.settings.impl}, loss_chunk_tokens={self.settings.chunk_tokens}"
        if implementation == "full":
            return f"full logits ({setting})"
        how = "Liger's fused kernel, counted as" if implementation == "liger" else ""
        return f"{how} chunked, {self.settings.chunk_tokens} positions a chunk ({setting})".strip()
