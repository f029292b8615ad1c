"""The CPU demo wing (`mlcd-vl demo`): everything the demo needs and nothing else imports.

    run.py         `mlcd-vl demo`: the six stages in order (data, tiny model, stage 1, stage 2, lmms-eval, chat)
    plan.py        the sizes of a run (`PLANS`: full and quick) and the demo's tiny model shapes
    stages.py      the stages that launch real code paths: training, lmms-eval, a chat through `serve.Engine`
    report.py      the per-stage wall clock, the results table and `report.md` / `results.json`
    playground.py  the seeded synthetic data (`python -m mlcd_vl.demo.playground OUT`)
    recipes/       the demo's training recipes (`demo_stage1.yaml`, `demo_stage2.yaml`)

Only the CLI imports this package; the untrained tiny model that tests and benches share is `model.tiny`, and the
web demo's example picture is in `mlcd_vl.assets`.
"""
