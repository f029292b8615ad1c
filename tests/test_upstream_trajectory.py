"""Upstream's own trainer, step for step: its recorded trajectory replayed through `mlcd_vl.train.run.train`.

`tests/fixtures/upstream/train_trajectory/` records N real optimizer steps of upstream's `LLaVATrainer` (its
`trajectory.json`: argv, settings, parameter groups, every micro-batch's record ids, loss and supervised count, every
step's pre-clip gradient norm and per-group learning rates, tolerances; `micro_batches.safetensors`: upstream's
collated ids and labels; `final_model.safetensors`: upstream's final save). The test

1. converts the starting upstream checkpoint with `mlcd_vl.model.convert` and continues from it (`model.checkpoint`);
2. writes the recorded micro-batch order as a `data.order_file` (the product's replay feature);
3. runs our trainer (`train()`, the function `mlcd-vl train` runs) with the README's upstream switches
   (`config.UPSTREAM_STEP_OVERRIDES`) and the run's own hyper-parameters, read from its argv;
4. compares, within the trajectory's `suggested_tolerances`: every micro-batch's record ids, dataset indices,
   collated ids and labels (our image-token blocks collapsed back to upstream's one -200 placeholder), supervised
   count and pixel hashes (exact); every micro-batch loss; every step's pre-clip gradient norm and the set of
   tensors that got a gradient; every trained tensor's learning rate and weight decay at every step, mapped onto
   upstream's parameter groups by their parameter names; and the final weights, converted back to upstream's
   format, against upstream's final save (tensors without gradient bit-identical).

Only recording wrappers are added (around `step.optimizer_step` and `TrainingForward.forward`); they read values and
change nothing. Everything comes from the trajectory's files, so a held-out trajectory made the same way runs too:
`MLCD_VL_TRAJECTORY` names its folder (default: `train_trajectory/` of the vectors folder, see conftest).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import upstream_utils as U
from mlcd_vl.model import anyres, pixels
from mlcd_vl.model.multimodal import expected_tokens
from mlcd_vl.model.upstream_format import upstream_name
from mlcd_vl.train import optim
from mlcd_vl.train import step as train_step
from mlcd_vl.train.config import UPSTREAM_STEP_OVERRIDES, load_config
from mlcd_vl.train.step import TrainingForward

REPO = Path(__file__).resolve().parents[1]
TRAJECTORY_ENV = "MLCD_VL_TRAJECTORY"
# transformers 4.44 TrainingArguments / LLaVA-NeXT defaults for flags an argv may leave out.
HF_DEFAULTS = {"learning_rate": "5e-5", "weight_decay": "0.0", "lr_scheduler_type": "linear", "warmup_ratio": "0.0",
               "warmup_steps": "0", "max_steps": "-1", "num_train_epochs": "3.0", "per_device_train_batch_size": "8",
               "gradient_accumulation_steps": "1", "gradient_checkpointing": "False", "max_grad_norm": "1.0",
               "seed": "42", "model_max_length": "512", "dataloader_drop_last": "False",
               "attn_implementation": "flash_attention_2", "mm_tunable_parts": None, "mm_projector_lr": "None",
               "mm_vision_tower_lr": "None"}


# ----------------------------------------------------------------------------------------------------------------
# Reading the trajectory
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    folder: Path
    data: dict
    argv: dict[str, str]

    @property
    def work_dir(self) -> Path:
        """Where upstream ran: the folder holding train_trajectory/ (trajectory.json -> working_directory)."""
        return self.folder.parent

    @property
    def micro_batches(self) -> list[dict]:
        return [micro for step in self.data["steps"] for micro in step["micro_batches"]]

    def arg(self, name: str) -> str | None:
        return self.argv.get(name, HF_DEFAULTS.get(name))

    def tolerance(self, key: str) -> float:
        """'relative 1e-9 (...)' / 'absolute 1e-5' -> the number."""
        found = re.match(r"\s*(relative|absolute)\s+([0-9.]+(?:e[-+]?\d+)?)", self.data["suggested_tolerances"][key])
        assert found, f"suggested_tolerances[{key!r}] is not '<relative|absolute> NUMBER ...'"
        return float(found.group(2))

    def weight_tolerances(self) -> tuple[float, float]:
        """(max |w - w_ref| per tensor, ||dW - dW_ref|| / ||dW_ref|| per tensor)."""
        text = self.data["suggested_tolerances"]["final_weights"]
        assert "max |w - w_ref|" in text and "||dW - dW_ref|| / ||dW_ref||" in text, text
        bounds = re.findall(r"<=\s*([0-9.]+(?:e[-+]?\d+)?)", text)
        assert len(bounds) == 2, text
        return float(bounds[0]), float(bounds[1])


def parse_argv(argv: list[str]) -> dict[str, str]:
    """`--flag value` pairs of upstream's command line (a flag without a value reads as True)."""
    parsed, index = {}, 1
    while index < len(argv):
        token = argv[index]
        assert token.startswith("--"), f"argv: unexpected {token!r}"
        takes_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
        parsed[token[2:]] = argv[index + 1] if takes_value else "True"
        index += 2 if takes_value else 1
    return parsed


@pytest.fixture(scope="module")
def trajectory(vectors_dir) -> Trajectory:
    env = os.environ.get(TRAJECTORY_ENV)
    folder = Path(env).expanduser() if env else vectors_dir / "train_trajectory"
    if not (folder / "trajectory.json").is_file():
        pytest.fail(f"training trajectory not found: {folder}/trajectory.json"
                    + (f" ({TRAJECTORY_ENV})" if env else ""))
    data = json.loads((folder / "trajectory.json").read_text())
    return Trajectory(folder, data, parse_argv(data["argv"]))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Our run, recorded
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Recording:
    """What our trainer did, read through wrappers that change nothing."""

    micro_batches: list[dict] = field(default_factory=list)  # collated batches, in training order
    losses: list[tuple[float, int]] = field(default_factory=list)  # (mean token loss, supervised targets)
    steps: list[dict] = field(default_factory=list)  # grad_norm; per upstream tensor name: lr, weight_decay, grad


def record_training(monkeypatch) -> Recording:
    recording = Recording()
    original_step, original_forward = train_step.optimizer_step, TrainingForward.forward

    def forward(self, batch, step):
        output = original_forward(self, batch, step)
        recording.losses.append((float(output.loss_sum) / max(output.supervised_tokens, 1), output.supervised_tokens))
        return output

    def optimizer_step(accelerator, model, optimizer, scheduler, micro_batches, *args, **kwargs):
        names = {id(p): upstream_name(n) for n, p in accelerator.unwrap_model(model).vlm.named_parameters()}
        seen: dict = {}

        def before_step(torch_optimizer, *_):
            groups = [(group, p) for group in torch_optimizer.param_groups for p in group["params"]]
            seen["lr"] = {names[id(p)]: float(group["lr"]) for group, p in groups}
            seen["weight_decay"] = {names[id(p)]: float(group["weight_decay"]) for group, p in groups}
            seen["grad"] = {names[id(p)]: float(p.grad.double().norm()) for _, p in groups if p.grad is not None}

        handle = getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(before_step)
        try:
            result = original_step(accelerator, model, optimizer, scheduler, micro_batches, *args, **kwargs)
        finally:
            handle.remove()
        recording.micro_batches.extend(micro_batches)
        recording.steps.append({"grad_norm": result[1], **seen})
        return result

    monkeypatch.setattr(train_step, "optimizer_step", optimizer_step)
    monkeypatch.setattr(TrainingForward, "forward", forward)
    return recording


def recipe_overrides(trajectory: Trajectory, checkpoint: Path, order_file: Path, output_dir: Path) -> list[str]:
    """The README's upstream switches, then this run's own settings from its argv (HF defaults where absent)."""
    arg, work, optimizer = trajectory.arg, trajectory.work_dir, trajectory.data["optimizer"]
    max_steps = int(arg("max_steps"))
    return [*UPSTREAM_STEP_OVERRIDES,
            f"model.checkpoint={checkpoint}", f"model.attn_implementation={arg('attn_implementation')}",
            f"data.train={work / arg('data_path')}", f"data.image_folder={work / arg('image_folder')}",
            f"data.order_file={order_file}", f"data.max_length={arg('model_max_length')}",
            f"data.drop_last={arg('dataloader_drop_last')}", "data.num_workers=0",
            f"tunable_parts={arg('mm_tunable_parts')}",
            f"optim.lr={arg('learning_rate')}", f"optim.projector_lr={arg('mm_projector_lr')}",
            f"optim.vision_tower_lr={arg('mm_vision_tower_lr')}", f"optim.weight_decay={arg('weight_decay')}",
            f"optim.adam_betas={list(optimizer['betas'])}", f"optim.adam_eps={optimizer['eps']}",
            f"optim.lr_scheduler={arg('lr_scheduler_type')}", f"optim.warmup_ratio={arg('warmup_ratio')}",
            f"optim.warmup_steps={arg('warmup_steps')}", f"optim.max_grad_norm={arg('max_grad_norm')}",
            f"optim.num_epochs={arg('num_train_epochs')}", f"optim.max_steps={max_steps if max_steps > 0 else None}",
            f"batch.per_device_batch_size={arg('per_device_train_batch_size')}",
            f"batch.grad_accum={arg('gradient_accumulation_steps')}",
            f"gradient_checkpointing={arg('gradient_checkpointing')}", f"seed={arg('seed')}", "precision=fp32",
            f"output_dir={output_dir}", "resume=never", "save_steps=None", "logging_steps=1", "report_to=none"]


@dataclass
class Replay:
    recording: Recording
    result: object
    settings: object
    tokenizer: object
    image_token_id: int
    model: torch.nn.Module  # the converted starting checkpoint (not trained)
    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def replay(trajectory, tmp_path_factory) -> Replay:
    from mlcd_vl.model.checkpoint import load_vlm
    from mlcd_vl.model.convert import convert
    from mlcd_vl.train.run import train

    settings_in = trajectory.data["settings"]
    assert settings_in.get("world_size", 1) == 1, "a multi-process trajectory needs a multi-process replay"
    assert settings_in["dtype"] == "float32", "upstream's run was not float32"
    root = tmp_path_factory.mktemp("trajectory")
    source = trajectory.work_dir / settings_in["checkpoint"]
    initial_file = trajectory.work_dir / trajectory.data["initial_weights"]["file"]
    assert sha256_file(initial_file) == trajectory.data["initial_weights"]["file_sha256"], "initial weights changed"
    checkpoint = convert(source, root / "start", template=trajectory.arg("version"), log=U.quiet)
    order_file = root / "order.json"
    order_file.write_text(json.dumps({"micro_batches": [m["record_ids"] for m in trajectory.micro_batches]}))
    config = load_config(None, recipe_overrides(trajectory, checkpoint, order_file, root / "run"))

    monkeypatch = pytest.MonkeyPatch()
    recording = record_training(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(trajectory.data["versions"].get("torch_num_threads", 1)))
    try:
        result = train(config)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    back = convert(result.output_dir, root / "final_upstream", log=U.quiet)
    final = {}
    for file in sorted(back.glob("*.safetensors")):
        final.update(load_file(str(file)))
    model, tokenizer, settings = load_vlm(checkpoint, dtype=torch.float32)
    # upstream's argv may override the checkpoint's image settings; the replay takes them from the checkpoint
    for flag, ours in (("image_aspect_ratio", settings.image_mode), ("mm_patch_merge_type", settings.merge_type),
                       ("image_grid_pinpoints", settings.pinpoints)):
        value = trajectory.argv.get(flag)
        if value is not None and flag == "image_grid_pinpoints":
            value = [tuple(pair) for pair in anyres.parse_pinpoints(value, settings.crop_size)]
        assert value is None or value == ours, f"argv --{flag} {value!r} differs from the checkpoint's {ours!r}"
    return Replay(recording, result, settings, tokenizer, model.config.image_token_id, model,
                  load_file(str(initial_file)), final)


# ----------------------------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------------------------


def upstream_view(batch: dict, settings, image_token_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our collated ids and labels as upstream's collator wrote them: each image's block of image tokens collapsed
    to one -200 placeholder (label -100), right-padded with the pad id / -100."""
    images = iter(batch["images"])
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        row_ids, row_labels, position, length = [], [], 0, int(mask.sum())
        while position < length:
            if int(ids[position]) == image_token_id:
                count = expected_tokens(next(images), settings)
                block = ids[position:position + count]
                assert bool((block == image_token_id).all()), "an image block shorter than its image's tokens"
                assert bool((labels[position:position + count] == U.IGNORE_INDEX).all()), "supervised image tokens"
                row_ids.append(U.UPSTREAM_IMAGE_INDEX)
                row_labels.append(U.IGNORE_INDEX)
                position += count
            else:
                row_ids.append(int(ids[position]))
                row_labels.append(int(labels[position]))
                position += 1
        rows.append((row_ids, row_labels))
    assert next(images, None) is None, "more images than image blocks"
    width = max(len(row_ids) for row_ids, _ in rows)
    out_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(rows), width), U.IGNORE_INDEX, dtype=torch.long)
    for index, (row_ids, row_labels) in enumerate(rows):
        out_ids[index, :len(row_ids)] = torch.tensor(row_ids)
        out_labels[index, :len(row_labels)] = torch.tensor(row_labels)
    return out_ids, out_labels


def test_micro_batches_are_upstreams(trajectory, replay):
    """Record ids, collated ids and labels, supervised counts and pixels: exact."""
    tensors = load_file(str(trajectory.folder / "micro_batches.safetensors"))
    expected = trajectory.micro_batches
    ours = replay.recording.micro_batches
    assert len(ours) == len(expected), f"{len(ours)} micro-batches trained, upstream {len(expected)}"
    pad_id = replay.tokenizer.pad_token_id
    dummy = U.sha256_f32(pixels.dummy_pixels(replay.settings.processor))
    for index, (batch, micro) in enumerate(zip(ours, expected)):
        where = f"micro-batch {index + 1} ({micro['tensors_key']})"
        assert batch["record_ids"] == micro["record_ids"], where
        ids, labels = upstream_view(batch, replay.settings, replay.image_token_id, pad_id)
        assert torch.equal(ids, tensors[f"{micro['tensors_key']}/input_ids"]), f"{where}: input_ids differ"
        assert torch.equal(labels, tensors[f"{micro['tensors_key']}/labels"]), f"{where}: labels differ"
        assert replay.recording.losses[index][1] == micro["n_supervised_targets"], where
        images = iter(batch["images"])
        hashes = [dummy if modality == "text" else U.sha256_f32(next(images).pixels)
                  for modality in micro["modalities"]]
        assert hashes == micro["image_tensor_sha256"], f"{where}: pixels differ"


def test_micro_batch_losses_are_upstreams(trajectory, replay):
    tolerance = trajectory.tolerance("micro_batch_loss")
    expected = [micro["loss"] for micro in trajectory.micro_batches]
    ours = [loss for loss, _ in replay.recording.losses]
    assert len(ours) == len(expected)
    worst = max(abs(a - b) for a, b in zip(ours, expected))
    print(f"micro-batch losses: max abs diff {worst:.3g} over {len(ours)} (tolerance {tolerance})")
    assert worst <= tolerance, list(zip(ours, expected))


def test_gradient_norms_and_trained_tensors_are_upstreams(trajectory, replay):
    """The pre-clip gradient norm of every step (relative tolerance), and exactly the same tensors got a gradient."""
    tolerance = trajectory.tolerance("grad_norm_preclip")
    steps = trajectory.data["steps"]
    assert len(replay.recording.steps) == len(steps) == replay.result.steps
    worst = 0.0
    for ours, step in zip(replay.recording.steps, steps):
        assert set(ours["grad"]) == set(step["grad_norm_per_tensor"]), f"step {step['step']}: other tensors trained"
        assert len(ours["grad"]) == step["n_tensors_with_grad"]
        relative = abs(ours["grad_norm"] - step["grad_norm_preclip"]) / step["grad_norm_preclip"]
        worst = max(worst, relative)
        assert relative <= tolerance, f"step {step['step']}: {ours['grad_norm']} vs {step['grad_norm_preclip']}"
    print(f"gradient norms: max relative diff {worst:.3g} over {len(steps)} steps (tolerance {tolerance})")


def test_learning_rates_and_weight_decay_follow_upstreams_groups(trajectory, replay):
    """Every tensor we train has, at every step, the learning rate and weight decay of the upstream group that holds
    it (groups matched by their parameter names); upstream's only other tensors are those that get no gradient."""
    tolerance = trajectory.tolerance("learning_rates")
    groups = trajectory.data["optimizer"]["param_groups"]
    group_of = {name: index for index, group in enumerate(groups) for name in group["params"]}
    without_gradient = set(trajectory.data["trainable"]["tensors_without_gradient"])
    for ours, step in zip(replay.recording.steps, trajectory.data["steps"]):
        assert set(ours["lr"]) <= set(group_of), f"tensors upstream does not train: {set(ours['lr']) - set(group_of)}"
        assert set(group_of) - set(ours["lr"]) <= without_gradient, "an upstream-trained tensor is not in our groups"
        for name, lr in ours["lr"].items():
            group = group_of[name]
            reference = step["lr_per_param_group"][group]
            assert abs(lr - reference) <= tolerance * abs(reference), \
                f"step {step['step']}: {name} lr {lr}, upstream group {group} ({groups[group]['what']}) {reference}"
            assert ours["weight_decay"][name] == groups[group]["weight_decay"], f"{name}: weight decay"


def test_upstream_no_decay_rule_is_llava_trainers(trajectory, replay):
    """`optim.no_decay_rule=upstream` exempts exactly the tensors of upstream's no-decay groups (whatever the weight
    decay, which may be 0 in the run); our default rule exempts others (RMSNorm weights, image_newline, ...)."""
    groups = trajectory.data["optimizer"]["param_groups"]
    grouped = {name for group in groups for name in group["params"]}
    expected = {name for group in groups if "no-decay" in group["what"] for name in group["params"]}
    assert expected, "no group is described as 'no-decay'"
    ours = {upstream_name(name) for name in optim.no_decay_names(replay.model, "upstream")} & grouped
    assert ours == expected, {"only ours": ours - expected, "only upstream's": expected - ours}
    default = {upstream_name(name) for name in optim.no_decay_names(replay.model, "default")} & grouped
    assert default != expected


def test_final_weights_are_upstreams(trajectory, replay):
    """Converted back to upstream's format: every tensor within the stated tolerances of upstream's final save
    (absolute, and relative on the update dW = final - initial); tensors without gradient bit-identical."""
    max_abs, max_update = trajectory.weight_tolerances()
    reference = load_file(str(trajectory.folder / trajectory.data["final_weights"]["file"]))
    assert set(replay.final) == set(reference), set(replay.final) ^ set(reference)
    without_gradient = set(trajectory.data["trainable"]["tensors_without_gradient"])
    worst_abs, worst_update = 0.0, 0.0
    for name, expected in reference.items():
        ours, start = replay.final[name], replay.initial[name]
        assert ours.shape == expected.shape and ours.dtype == expected.dtype, name
        update = (expected.double() - start.double()).norm()
        if name in without_gradient or not update:  # no gradient, or frozen
            assert torch.equal(ours, expected) and torch.equal(ours, start), f"{name} moved, upstream's did not"
            continue
        difference = float((ours.double() - expected.double()).abs().max())
        update_error = float(((ours.double() - start.double()) - (expected.double() - start.double())).norm() / update)
        worst_abs, worst_update = max(worst_abs, difference), max(worst_update, update_error)
        assert difference <= max_abs, f"{name}: max abs diff {difference}"
        assert update_error <= max_update, f"{name}: relative update error {update_error}"
    print(f"final weights: max abs diff {worst_abs:.3g} (tolerance {max_abs}), max relative update error "
          f"{worst_update:.3g} (tolerance {max_update})")


@pytest.mark.parametrize("document", ["README.md", "configs/recipes/mlcd_bigG448_stage1.yaml",
                                      "configs/recipes/mlcd_bigG448_stage2.yaml"])
def test_docs_list_the_upstream_switches(document):
    """The README's "same experiment" overrides, and the MLCD recipes' notes, are the ones this replay uses."""
    text = (REPO / document).read_text()
    missing = [override for override in UPSTREAM_STEP_OVERRIDES if override not in text]
    assert not missing, f"{document} does not name {missing}"
