"""The architectures of the preset LLMs and vision towers, so a plan needs no download, and dataset sizes.

`mlcd_vl.presets` names the models and their image settings; this table adds the numbers a model is built from
(its `config.json` fields), keyed by hub id. Values are those of the hub configs (Qwen2.5-7B-Instruct's and MLCD
bigG-448's `config.json`, as upstream's stage-2 checkpoint composes them; the Qwen2.5 model cards for 0.5B / 1.5B;
the CLIP and SigLIP hub configs; OpenCLIP's ViT-H-14-378 config for DFN5B). `tests/test_plan.py` checks every
preset is covered and fits its preset. Anything else (a local folder, a hub id in the local HF cache) is read with
`AutoConfig.from_pretrained`.
"""

from __future__ import annotations

# Qwen2.5's tokenizer has 151,665 entries; `<image>` is added at that id, inside every Qwen2.5 vocabulary (no resize).
QWEN25_TOKENIZER_SIZE = 151665

_QWEN2 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6,
              max_position_embeddings=32768)

LLM_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-7B-Instruct": dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
}
LLM_TOKENIZER_SIZES = {hub_id: QWEN25_TOKENIZER_SIZE for hub_id in LLM_CONFIGS}

_MLCD_BIGG = dict(model_type="mlcd_vision_model", hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                  num_attention_heads=16, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
_CLIP_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
               num_attention_heads=16, patch_size=14, image_size=336, hidden_act="quick_gelu",
               projection_dim=768, layer_norm_eps=1e-5)

TOWER_CONFIGS: dict[str, dict] = {
    "DeepGlint-AI/mlcd-vit-bigG-patch14-448": dict(_MLCD_BIGG, image_size=448),
    "DeepGlint-AI/mlcd-vit-bigG-patch14-336": dict(_MLCD_BIGG, image_size=336),
    "DeepGlint-AI/mlcd-vit-large-patch14-336": dict(_CLIP_L),
    "openai/clip-vit-large-patch14-336": dict(_CLIP_L),
    "google/siglip-so400m-patch14-384": dict(model_type="siglip_vision_model", hidden_size=1152,
                                             intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                             patch_size=14, image_size=384, hidden_act="gelu_pytorch_tanh",
                                             layer_norm_eps=1e-6),
    # An OpenCLIP checkpoint on the hub; these are the fields of the CLIPVisionModel it converts to (model/openclip.py)
    "apple/DFN5B-CLIP-ViT-H-14-378": dict(model_type="clip_vision_model", hidden_size=1280, intermediate_size=5120,
                                          num_hidden_layers=32, num_attention_heads=16, patch_size=14, image_size=378,
                                          hidden_act="quick_gelu", projection_dim=1024, layer_norm_eps=1e-5),
}

# Records of the dataset presets (mlcd_vl.data.sources.DATASET_PRESETS), from the dataset cards.
DATASET_SAMPLES = {"lcs-558k": 558_128, "llava-next-780k": 779_289}


def _config(table: dict[str, dict], hub_id: str):
    fields = table.get(hub_id)
    if fields is None:
        return None
    from transformers import AutoConfig

    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def llm_config(hub_id: str):
    """A transformers config for a preset LLM hub id, else None."""
    return _config(LLM_CONFIGS, hub_id)


def tower_config(hub_id: str):
    """A transformers vision config for a preset tower hub id, else None."""
    return _config(TOWER_CONFIGS, hub_id)
