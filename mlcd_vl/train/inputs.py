"""What a recipe reads, checked before anything is built or written: the data (`data.train`, `data.image_folder`,
`data.order_file`) and where the model comes from (`model.llm`, `model.tower`, `model.init_from`,
`model.checkpoint`, by `model.sources.model_source`'s rule).

A missing input stops the run at once with one line that names the key and the value, before the model is built
and before the output folder is written; the launcher scripts ask the same through `mlcd_vl.train.launch` before
torchrun starts a process. The entries of a YAML mixture are checked when the mixture is read (also one line).
"""

from __future__ import annotations

from pathlib import Path

from mlcd_vl.data.config import DataConfig
from mlcd_vl.errors import UsageError
from mlcd_vl.train.config import ModelConfig, TrainConfig

TINY = "tiny"  # the locally written tiny preset (`train.models`)
# The tiny recipes (configs/recipes/tiny_stage*.yaml) read the playground's synthetic data, written by this command
# (scripts/pretrain.sh and scripts/finetune.sh run it when the data is missing).
PLAYGROUND_DATA = "playground/tiny/data"
PLAYGROUND_COMMAND = f"python -m mlcd_vl.demo.playground {PLAYGROUND_DATA}"


def _hint(path: str) -> str:
    in_playground = Path(PLAYGROUND_DATA).resolve() in [Path(path).resolve(), *Path(path).resolve().parents]
    return f" (the tiny recipes' data: write it with `{PLAYGROUND_COMMAND}`)" if in_playground else ""


def check_data(data: DataConfig) -> None:
    from mlcd_vl.data.sources import expand_braces, find_preset

    if not data.train:
        raise UsageError("data.train: no training data named (data.train=FILE)")
    if not Path(data.train).exists() and find_preset(data.train) is not None:
        pass  # a dataset preset: read from data.preset_dir or downloaded
    else:
        for path in expand_braces(data.train):
            if not Path(path).exists():
                raise UsageError(f"data.train: data file not found: {path}{_hint(path)}")
    if data.image_folder and not Path(data.image_folder).is_dir():
        raise UsageError(f"data.image_folder: no such folder: {data.image_folder}{_hint(data.image_folder)}")
    if data.order_file and not Path(data.order_file).is_file():
        raise UsageError(f"data.order_file: no such file: {data.order_file}")


def check_model(model: ModelConfig) -> None:
    from mlcd_vl import presets
    from mlcd_vl.model.sources import model_source

    if model.checkpoint:  # its weights, tokenizer and settings replace llm / tower
        model_source(model.checkpoint, "model.checkpoint")
    else:
        if model.llm != TINY:
            model_source(presets.resolve_llm(model.llm), "model.llm")
        if model.tower != TINY:
            model_source(presets.resolve_tower(model.tower), "model.tower")
    if model.init_from:
        model_source(model.init_from, "model.init_from", files=True)


def check_inputs(config: TrainConfig) -> None:
    """Every input of the recipe exists (or is a reachable hub id); raises a one-line `UsageError` otherwise."""
    check_data(config.data)
    check_model(config.model)
