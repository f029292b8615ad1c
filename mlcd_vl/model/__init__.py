"""The VLM itself (floor 2 of the house, `mlcd_vl/__init__.py`): transformers' own LLaVA classes, our settings.

- `build`: compose a VLM from an LLM and a tower (`VLMSpec`, `VLMSettings`); `build_command`: `mlcd-vl build`.
- `sharded`: the same build (and a checkpoint's load) partitioned under DeepSpeed ZeRO-3, tensor by tensor from
  safetensors; `gathered`: whole views of ZeRO-3-partitioned parameters, a no-op on ordinary ones.
- `checkpoint`: HF-native save and load; `convert` (+ `convert_to_hf`, `convert_to_upstream`, `upstream_format`):
  upstream LLaVA checkpoints both ways.
- `anyres` (geometry, token counts), `pixels` (image processing, bit-exact with upstream), `multimodal` (the merge
  of image features into the prompt), `varlen` (per-sample attention for packed rows), `templates` (chat templates).
- `tiny`: the tiny preset, and the untrained tiny VLM the tests and benches share (`build_tiny_vlm`).
"""
