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
<<<<<<< HEAD
       plan/                    `mlcd-vl plan`: a recipe's memory, steps and time before it runs (plan sits on
                                train's config, optimizer groups, sampler and DeepSpeed JSON)
    5  demo/                    the CPU demo wing (`mlcd-vl demo`)
=======
    5  demo/  study/            the CPU demo wing (`mlcd-vl demo`); the encoder study (`mlcd-vl study`), which runs
                                the demo's playground and stages for its CPU version
>>>>>>> ac0b883 (mlcd-vl study: the encoder study as one job (per tower stage 1, stage 2 and lmms-eval through the single-run launchers, only the tower and its image settings changed), resumed by stamps written after a step's outputs exist (other settings refused), data manifests checked before a stage and before the table (--allow-different-data), the table with published rows, visual tokens per sample, tokens/s, wall time and manifest hashes, a bar chart per benchmark; the CPU version on tiny tower families; eval summarize: one row per run folder, scoring settings compared across rows (eval/compare.py))
    6  cli.py                   `mlcd-vl`, the one entry point; nothing imports it
"""

__version__ = "0.1.0"
