"""Training data (floor 3 of the house, `mlcd_vl/__init__.py`): records -> samples -> batches, one direction.

- `config`: `DataConfig`, the settings of all of it (a recipe's `data:` section, key for key).
- `sources` (LLaVA JSON/JSONL, YAML mixtures, datasets, presets) -> `samples` (the label builder) -> `dataset`
  (the torch Dataset and the length scan) -> `samplers` (length grouping, packing; `order_file`: a listed
  micro-batch order replayed) -> `collate` / `packing` (padded or packed batches). `problems`: bad records,
  skipped with a counted reason; `check`: `mlcd-vl data check`.
"""
