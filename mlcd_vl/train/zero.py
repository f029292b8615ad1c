"""DeepSpeed specifics of the recipe: its JSON with every "auto" filled, one-process launches, the ZeRO stage, and a
ZeRO-3 run's final weights.

ZeRO-1/2 keep every parameter whole on every rank, so the module itself is saved as without DeepSpeed.

ZeRO-3 partitions parameters across ranks. Two ways to get them back whole:

* gather the 16-bit weights onto rank 0 (`stage3_gather_16bit_weights_on_model_save`, accelerate's
  `get_state_dict`): one collective per parameter, all of the model in rank 0's memory at once, under the
  collective timeout; known to hang or time out at the end of long 7B runs (anchors section 3, "Hang or NCCL
  timeout at final save"), and it rounds the fp32 master weights to 16 bits;
* sharded (what this module does): every rank writes its own partition with `engine.save_checkpoint` (no gather,
  only a barrier), then the main process rebuilds the fp32 weights from the files with DeepSpeed's own
  `zero_to_fp32` reader (file reads, no collective, so no timeout). The price is disk: the scratch checkpoint also
  holds the optimizer partitions (about 12 bytes per trainable parameter), and it is deleted afterwards; and on
  several nodes `output_dir` must be a filesystem they all share (the main process reads every rank's files).

The sharded path is used; `stage3_gather_16bit_weights_on_model_save` in the JSON configs is left as upstream had
it and is not relied on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from mlcd_vl.train.config import TrainConfig

SCRATCH_NAME = "zero3-final.tmp"
PREFIX = "vlm."  # the wrapped module is `step.TrainingForward`, whose only child is `vlm`


def deepspeed_config(config: TrainConfig, hidden_size: int, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON with every "auto" filled from the recipe (as the HF Trainer would)."""
    ds = json.loads(Path(config.deepspeed).read_text())
    fill = {"train_micro_batch_size_per_gpu": 1 if config.data.packing else config.batch.per_device_batch_size,
            "gradient_accumulation_steps": config.batch.grad_accum,
            "gradient_clipping": config.optim.max_grad_norm or 0.0}
    fill["train_batch_size"] = fill["train_micro_batch_size_per_gpu"] * world_size * config.batch.grad_accum
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key, enabled in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if key in ds and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = enabled
    zero = ds.get("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"{config.deepspeed}: remove the {section!r} block; the recipe builds torch AdamW and "
                             "the schedule (optim.*)")
    return ds


def single_process_launch_env() -> bool:
    """Make a plain `python -m mlcd_vl.train` with a DeepSpeed config a one-process distributed run (as torchrun
    with one process would): DeepSpeed needs a process group. Returns whether anything was set."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return True


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def consolidated_state_dict(accelerator, model, output_dir: str | Path, step: int) -> dict | None:
    """A ZeRO-3 engine's full fp32 state dict (keys as `vlm.state_dict()`) on the main process, None elsewhere.

    Every rank must call it. (Under ZeRO-1/2 the unwrapped module already holds every weight whole.)
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    scratch = Path(output_dir) / SCRATCH_NAME
    tag = f"global_step{step}"
    if accelerator.is_main_process and scratch.exists():
        shutil.rmtree(scratch)
    accelerator.wait_for_everyone()
    model.save_checkpoint(str(scratch), tag=tag)  # the engine: every rank writes its own partition
    accelerator.wait_for_everyone()
    state = None
    if accelerator.is_main_process:
        state = get_fp32_state_dict_from_zero_checkpoint(str(scratch), tag=tag)
        state = {k.removeprefix(PREFIX): v for k, v in state.items()}
        shutil.rmtree(scratch)
    accelerator.wait_for_everyone()
    return state
