"""What a training run reports: per-step throughput, an MFU estimate, the metrics JSONL file and the loss curve.

Throughput counts, per optimizer step and summed over ranks (`StepCounts`): samples, tokens (real tokens, no
padding), supervised tokens, padded positions (rows x width) and vision-tower tokens (crops x tokens per crop).

MFU estimate (model FLOPs utilisation), documented approximation:

    FLOPs per step ~= 6 x (LLM + projector parameters) x LLM tokens + 6 x tower parameters x tower tokens

i.e. the usual "6N per token" (2N forward + 4N backward) applied to every parameter, trainable and frozen alike
(frozen parts still back-propagate activations in stage 2; in stage 1 this overestimates the tower's share), with
attention's quadratic term and padding ignored. Two variants for benchmarks (the training log uses neither):
`head_params` counts an LM head applied to the supervised positions only (as `train.step.forward_loss` does),
6 x head x supervised tokens, instead of folding it into the LLM's 6N over every token; and
`step_flops(counts, with_tower=False)` leaves the tower's term out (MFU "without the vision tower", as some peers
publish it: the step time still includes the tower). Peak FLOPs per device come from `MLCD_VL_PEAK_FLOPS` (FLOP/s,
e.g. 989e12) or from a small table of dense bf16 tensor-core peaks by GPU name; on CPU or an unknown GPU the MFU
is None ("n/a").

Trackers (`report_to: tensorboard | wandb`, through accelerate): the numeric fields of each record, the learning
rates as `lr/<group>`, and the resolved config flattened to dotted keys. TensorBoard event files go to
`<output_dir>/mlcd_vl/`, wandb's run folder to `<output_dir>/wandb/` (`WANDB_MODE=offline` needs no account).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

PEAK_FLOPS_ENV = "MLCD_VL_PEAK_FLOPS"
# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                   ("L40S", 362e12), ("L40", 181e12), ("A10", 125e12), ("4090", 165e12), ("V100", 125e12))


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device: the env var, else the table for a known GPU, else None."""
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


@dataclass
class StepCounts:
    """What one optimizer step processed (summed over its micro-batches; over ranks after `reduce`)."""

    loss_sum: float = 0.0  # summed token loss
    supervised: int = 0
    tokens: int = 0  # real (non-padding) tokens
    positions: int = 0  # rows x width, padding included
    samples: int = 0
    tower_tokens: int = 0  # crops x (patches + CLS) through the vision tower
    empty_micro_batches: int = 0

    def add_batch(self, batch: dict, loss_sum: float, supervised: int, tokens_per_crop: int) -> None:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if "seq_lengths" in batch:
            self.tokens += sum(batch["seq_lengths"])
        elif mask is not None and mask.dim() == 2:
            self.tokens += int(mask.sum())
        else:
            self.tokens += ids.numel()
        self.positions += ids.numel()
        self.samples += len(batch.get("record_ids", ()))
        self.supervised += int(supervised)
        self.loss_sum += float(loss_sum)
        self.tower_tokens += sum(image.crops.shape[0] for image in batch.get("images", ())) * tokens_per_crop

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([float(getattr(self, f.name)) for f in fields(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> StepCounts:
        items = values.tolist()
        return cls(**{f.name: (items[i] if f.type == "float" else round(items[i]))
                      for i, f in enumerate(fields(cls))})


@dataclass
class FlopsModel:
    """Parameter counts for the 6N estimate (module docstring)."""

    llm_params: int  # language model + projector (+ image_newline); applied to every real token
    tower_params: int
    head_params: int = 0  # an LM head counted apart, applied to the supervised tokens only (0: inside llm_params)

    @classmethod
    def from_summary(cls, summary: dict) -> FlopsModel:
        return cls(summary["language_model"].total + summary["projector"].total, summary["vision_tower"].total)

    def step_flops(self, counts: StepCounts, with_tower: bool = True) -> float:
        flops = self.llm_params * counts.tokens + self.head_params * counts.supervised
        if with_tower:
            flops += self.tower_params * counts.tower_tokens
        return 6.0 * flops


def step_record(step: int, epoch: float, counts: StepCounts, seconds: float, lrs: dict[str, float],
                grad_norm: float | None, flops: FlopsModel, peak: float | None, world_size: int) -> dict:
    """One line of metrics.jsonl (counts already summed over ranks)."""
    seconds = max(seconds, 1e-9)
    loss = counts.loss_sum / counts.supervised if counts.supervised else float("nan")
    mfu = flops.step_flops(counts) / seconds / (peak * world_size) if peak else None
    return {
        "step": step, "epoch": round(epoch, 4), "loss": loss,
        "lr": lrs, "grad_norm": grad_norm,
        "tokens_per_s": counts.tokens / seconds,
        "supervised_tokens_per_s": counts.supervised / seconds,
        "samples_per_s": counts.samples / seconds,
        "padding_fraction": 1.0 - counts.tokens / counts.positions if counts.positions else 0.0,
        "mfu": mfu, "step_seconds": seconds,
        "samples": counts.samples, "supervised_tokens": counts.supervised,
        "empty_micro_batches": counts.empty_micro_batches,
    }


def format_record(record: dict) -> str:
    """The console's step line, within 100 columns: the largest learning rate (every group's rate, samples/s and
    supervised tokens/s are in metrics.jsonl and the trackers)."""
    lr = f"{max(record['lr'].values()):.1e}" if record["lr"] else "n/a"
    grad = f"{record['grad_norm']:.3g}" if record["grad_norm"] is not None else "n/a"
    mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
    return (f"step {record['step']}  loss {record['loss']:.4f}  lr {lr}  grad {grad}  "
            f"{record['tokens_per_s']:.0f} tok/s  pad {100 * record['padding_fraction']:.0f}%  MFU {mfu}")


class MetricsWriter:
    """One JSON object per logged step in `<output_dir>/metrics.jsonl` (main process only).

    A fresh run starts the file anew; a run resumed at step N keeps the lines of steps <= N (`keep_until`).
    """

    def __init__(self, path: str | Path, keep_until: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        kept = []
        if keep_until and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._handle = self.path.open("a")

    def write(self, record: dict) -> None:
        self.records.append(record)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._handle.write(json.dumps(clean) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def plot_loss_curve(records: list[dict], path: str | Path, title: str = "training loss") -> Path | None:
    """A PNG of loss per step (matplotlib's Agg backend); None when matplotlib is missing or nothing was logged."""
    points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(*zip(*points), marker="." if len(points) < 50 else None, linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (token mean)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def tracker_values(record: dict) -> dict[str, float]:
    """What a tracker gets from one metrics record: numbers only, learning rates as `lr/<group>`."""
    values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    values.update({f"lr/{name}": lr for name, lr in record.get("lr", {}).items()})
    return values


def tracker_config(config) -> dict:
    """The resolved config as flat `section.key` -> scalar (lists as strings), for the trackers' hparams."""
    from mlcd_vl.train.config import config_to_dict

    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config_to_dict(config))
    return flat


def tracker_init_kwargs(report_to: str, output_dir: str | Path) -> dict:
    if report_to == "wandb":
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return {"wandb": {"dir": str(folder), "name": folder.name}}
    return {}
