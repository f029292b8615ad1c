"""The CPU demo wing (`mlcd-vl demo`): everything the demo needs and nothing else imports.

    run.py         `mlcd-vl demo`: the six stages in order (data, tiny model, stage 1, stage 2, lmms-eval, chat)
    plan.py        the sizes of a run (`PLANS`: full and quick) and the demo's tiny model shapes
    stages.py      the stages that launch real code paths: training, lmms-eval, a chat through `serve.Engine`
    report.py      the per-stage wall clock, the results table and `report.md` / `results.json`
    playground.py  the seeded synthetic data (`python -m mlcd_vl.demo.playground OUT`)
    recipes/       the demo's training recipes (`demo_stage1.yaml`, `demo_stage2.yaml`)

How the stages run (`run.py`'s docstring is the user's `mlcd-vl demo --help`): the data comes from
`playground.write_playground`, the model from `model.tiny.write_tiny_assets` at `plan.demo_shapes()`; training runs
`NUM_GPUS=1 RECIPE=... scripts/pretrain.sh` / `finetune.sh` (torchrun, one process) in a repository checkout, else
`python -m mlcd_vl.train RECIPE overrides` (`--launcher`); lmms-eval 0.7.3 runs the `mlcd_llava` adapter on one
ChartQA-style task per skill. `--quick` is what the CI test (`tests/test_demo.py`) runs; the full run took 4.5-6.5
minutes on a busy 2-core machine (load average 2-5).

Only the CLI imports this package; the untrained tiny model that tests and benches share is `model.tiny`, and the
web demo's example picture is in `mlcd_vl.assets`.
"""
