"""The encoder study (`mlcd-vl study`): the MLCD table's comparison of vision towers as one reproducible job.

    run.py      `mlcd-vl study RECIPES --towers a,b,c`: per tower stage 1, stage 2 and lmms-eval through the launchers
                a single run uses, resumed where it stopped; then the table and the plots
    towers.py   the study's towers (presets, or their tiny versions for the CPU study) and the only recipe settings
                a tower changes
    ledger.py   what marks a step finished (a stamp written after its outputs are all there) and the settings check
    facts.py    what the table reports per tower, read back from the run folders: tokens/s, visual tokens per
                sample, the data manifests, the scores
    report.py   `study.md`, `study.json` and one bar chart per benchmark

It sits beside the demo wing (floor 5): the CPU study runs the demo's playground data, tiny recipes, launch and
evaluation stages. Only the CLI imports it.
"""
