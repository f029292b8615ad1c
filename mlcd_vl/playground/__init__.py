"""The embedded default: synthetic data and tiny recipes for the CPU demo (`mlcd-vl demo`).

* `generate` draws seeded images (coloured shapes, counts of shapes, labelled bar charts, rendered words) and writes
  them in the real formats: LLaVA JSON + an image folder for training (captions for stage 1, single- and multi-turn
  question/answer conversations for stage 2) and, for scoring, one parquet file per skill in the schema of
  lmms-eval's ChartQA (`type`, `question`, `answer`, `image`) from a held-out split never seen in training.
* `recipes/demo_stage{1,2}.yaml` are the demo's training recipes (the tiny CPU versions of
  configs/recipes/mlcd_bigG448_stage{1,2}.yaml); `RECIPES` points at them.

It lives inside the package (not only in the repository's `playground/` folder) so that `mlcd-vl demo` works from
any directory once the package is installed; `playground/generate.py` in the repository is a thin command line over
`generate`.
"""

from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"
