"""Training: configuration, freezing and optimizer groups, the loss, and one micro-batch's forward.

- `config`: `TrainConfig` dataclasses, YAML recipes (`configs/recipes/`) with dotted overrides, resolved-config saving.
- `optim`: freezing by upstream's tunable parts, per-part learning rates, AdamW + schedule, parameter counts,
  the stage-1 projector artifact (ours and upstream's `mm_projector.bin`).
- `loss`: shifted token cross-entropy and its normalisation over a whole optimizer step (or upstream's).
- `head_loss`: the LM head + cross-entropy on the supervised positions: full logits, chunked (bounded memory)
  or Liger's fused kernel (`optim.loss_impl`).
- `step`: the `TrainBatch` contract the data pipeline fills, `forward_loss`, and `TrainingForward`, the module
  DDP / DeepSpeed wrap.
- `run`: the training recipe (`python -m mlcd_vl.train RECIPE key=value ...`), built from `loop` (model, data,
  one optimizer step), `metrics` (throughput, MFU estimate, metrics.jsonl, loss curve) and `checkpointing`
  (atomic intermediate checkpoints, resume).

Submodules are imported explicitly (`from mlcd_vl.train.config import load_config`) so that importing the package
stays cheap.
"""
