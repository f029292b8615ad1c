"""Training data (floor 3 of the house, `mlcd_vl/__init__.py`): records -> samples -> batches, one direction.

- `config`: `DataConfig`, the settings of all of it (a recipe's `data:` section, key for key).
- `sources` (LLaVA JSON/JSONL, YAML mixtures, datasets, presets) -> `samples` (the label builder) -> `dataset`
  (the torch Dataset and the length scan) -> `samplers` (length grouping, packing; `order_file`: a listed
  micro-batch order replayed) -> `collate` / `packing` (padded or packed batches). `problems`: bad records,
  skipped with a counted reason; `check`: `mlcd-vl data check`.
- Paid once: `json_index` (JSON / JSONL read lazily through a byte-offset index), `manifest` (what a run sees, one
  hash; `manifest_cli`: `data manifest`, `data check --manifest`), `lengths_cache` (the scan's length table) and
  `startup` (both, for a run), all kept under the `cache` folder.
"""
