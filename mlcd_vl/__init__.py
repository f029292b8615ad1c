"""mlcd-vl: train, evaluate and serve LLaVA-NeXT-style VLMs built from an MLCD vision tower and Qwen2.5.

The house, floor by floor; a module imports only from its own floor or the floors below it, never in a circle
(`tests/test_house_plan.py` checks both):

    0  vocab.py                 shared words: IGNORE_INDEX, <image> and its expansion, the anyres grid type, the
                                pixel limit
       console.py               what the terminal shows: plain-text tables, DeepSpeed's CPU notice kept quiet
       errors.py                the user-error types every command raises and the one place that reports them
    1  presets.py, assets/      named towers (with their image settings and statistics) and LLMs, the upstream grid;
                                bundled files (the demo picture)
    2  model/                   build, load and save the VLM, pixels, anyres, chat templates, the tiny preset,
                                upstream conversion; where a model comes from (a folder or a hub id: `sources`)
    3  data/                    records -> samples -> batches (`data.config.DataConfig` owns its settings)
    4  train/  serve/  eval/    the recipe (`train.run`); the engine with its one decode loop and the servers; the
                                lmms-eval adapter (eval sits on serve's engine)
       plan/                    `mlcd-vl plan`: a recipe's memory, steps and time before it runs (plan sits on
                                train's config, optimizer groups, sampler and DeepSpeed JSON)
    5  demo/                    the CPU demo wing (`mlcd-vl demo`)
    6  cli.py                   `mlcd-vl`, the one entry point; nothing imports it
"""

__version__ = "0.1.0"
