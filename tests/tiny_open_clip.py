"""A tiny random OpenCLIP ViT written in the layout of `apple/DFN5B-CLIP-ViT-H-14-378` (for the converter tests).

OpenCLIP itself builds the model (from a custom tiny config with QuickGELU, as DFN5B's) and writes
`open_clip_config.json` the way `push_to_hf_hub` does, with DFN5B's preprocessing (bicubic "squash" resize, OpenAI
CLIP mean/std). Every parameter is randomised (LayerNorm weights around 1), so a swapped or misplaced tensor in the
conversion changes the features.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import open_clip
import safetensors.torch
import torch
from open_clip.push_to_hf_hub import save_config_for_hf

TINY_NAME = "mlcd-vl-tiny-ViT-14-42-quickgelu"
TINY_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 42, "layers": 3, "width": 32, "head_width": 16, "patch_size": 14, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
DFN5B_PREPROCESS = {"interpolation": "bicubic", "resize_mode": "squash"}


def create_tiny_open_clip(config: dict = TINY_CONFIG, seed: int = 0, name: str = TINY_NAME):
    """A randomly initialised OpenCLIP model of `config` (registered under `name`), DFN5B's preprocessing."""
    with tempfile.TemporaryDirectory() as registry:  # OpenCLIP reads the config when it is added
        path = Path(registry) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, force_preprocess_cfg=dict(DFN5B_PREPROCESS))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            is_norm_weight = key.endswith("weight") and parameter.dim() == 1
            parameter.copy_((1.0 if is_norm_weight else 0.0) + 0.2 * torch.randn_like(parameter))
    return model.eval()


def write_tiny_open_clip(folder: Path, config: dict = TINY_CONFIG, seed: int = 0, *, pickle: bool = False) -> Path:
    """An OpenCLIP checkpoint folder: open_clip_config.json + safetensors weights (or only the pickle file)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = create_tiny_open_clip(config, seed)
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    if pickle:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        safetensors.torch.save_file(state, folder / "open_clip_model.safetensors")
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=config)
    return folder
