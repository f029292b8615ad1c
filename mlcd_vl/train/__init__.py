"""Training, read in the order `run.py` uses the parts (config -> model -> what trains -> data -> strategy -> loop):

- `config`: `TrainConfig` (its `data` section is `data.config.DataConfig`), YAML recipes with dotted overrides, the
  resolved-config file; what the settings mean for a run (stage, attention, block mask) is decided there, once.
- `models`: the recipe's VLM (sources, the `tiny` preset, attention, the stage-1 projector, or a checkpoint to
  continue from).
- `optim`: freezing by upstream's tunable parts, per-part LRs, AdamW + schedule, parameter counts, the projector
  artifact (ours and upstream's `mm_projector.bin`). `lora`: LoRA adapters on the LLM and their merge.
- `loader`: dataset, length scan, sampler (or `data.order_file`'s replayed order), collator, DataLoader.
- `loss`: shifted token cross-entropy and its normalisation over a whole optimizer step (or upstream's).
- `head_loss`: the LM head + cross-entropy on the supervised positions: full logits, chunked (bounded memory)
  or Liger's fused kernel (`optim.loss_impl`).
- `step`: the `TrainBatch` contract, `forward_loss`, `TrainingForward` (what DDP / DeepSpeed wrap) and
  `optimizer_step`.
- `zero`: DeepSpeed's JSON filled from the recipe, one-process launches, ZeRO-3's final weights streamed to disk.
- `metrics` (throughput, MFU estimate, metrics.jsonl, loss curve), `checkpointing` (atomic checkpoints, resume).
- `run`: the recipe top to bottom (`python -m mlcd_vl.train RECIPE key=value ...`); `launch`: the launcher scripts'
  pre-flight check. Nothing imports `run` but the CLI and `__main__`.

Submodules are imported explicitly (`from mlcd_vl.train.config import load_config`) so that importing the package
stays cheap.
"""
