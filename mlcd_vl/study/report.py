"""The study's table (`study.md`, `study.json`) and one bar chart per benchmark (`plots/<column>.png`).

One row per tower in the MLCD table's format (tower x ChartQA / DocVQA / InfoVQA / OCRBench / MMMU, in the
paper's units), each followed by its published row (`eval.summarize.PUBLISHED`, the one copy of those numbers), then
per tower: visual tokens per sample, training tokens/s, wall time and the data manifests' hashes. The CPU study's
columns are the demo's held-out skills instead (with a chance row); the published rows of the full-size towers are
shown apart, for reference, since the CPU study does not run the real benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlcd_vl.console import duration
from mlcd_vl.eval.summarize import COLUMNS, format_score, published_row
from mlcd_vl.study.facts import TowerFacts
from mlcd_vl.study.towers import StudyTower

UNITS = {"ChartQA": "relaxed accuracy x100", "DocVQA": "ANLS x100", "InfoVQA": "ANLS x100",
         "OCRBench": "points of 1000", "MMMU": "accuracy x100"}


def _score(value: float | None, column: str) -> str:
    """The MLCD benchmarks as the MLCD table writes them (`summarize.format_score`), the demo's skills in % x.1."""
    if column in COLUMNS:
        return format_score(value, column, missing="")
    return "" if value is None else f"{value:.1f}"


def _pair(values: list, fmt) -> str:
    return " / ".join("-" if v is None else fmt(v) for v in values)


def columns_for(tiny: bool) -> list[str]:
    if tiny:
        from mlcd_vl.demo.playground import SKILLS

        return list(SKILLS)
    return list(COLUMNS)


def render(towers: list[StudyTower], facts: list[TowerFacts], *, tiny: bool, notes: list[str],
           settings_table: str, warnings: list[str]) -> str:
    columns = columns_for(tiny)
    head = ["tower", *columns, "visual tokens / sample (stage 1 / 2)", "training tokens/s (stage 1 / 2)",
            "wall time", "data manifest (stage 1 / 2)"]
    lines = ["# Encoder study" + (" (CPU, tiny towers)" if tiny else ""), "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for tower, fact in zip(towers, facts):
        stages = [fact.stages.get(1), fact.stages.get(2)]
        cells = [f"{tower.label}" + ("" if tiny else ": ours"),
                 *[_score(fact.scores.get(c), c) for c in columns],
                 _pair([s.visual_tokens if s else None for s in stages], lambda v: v.describe()),
                 _pair([s.tokens_per_s if s else None for s in stages], lambda v: f"{v:.0f}"),
                 duration(fact.wall_seconds),
                 _pair([s.manifest_hash if s else None for s in stages], lambda v: f"`{v[:12]}`")]
        lines.append("| " + " | ".join(cells) + " |")
        published = published_row(tower.preset.name)
        if published and not tiny:
            lines.append(f"| {tower.label}: published | " + " | ".join(_score(published[1].get(c), c)
                                                                       for c in columns) + " |" + " |" * 4)
    if tiny:
        from mlcd_vl.demo.playground import chance

        lines.append("| chance (uniform guess) | " + " | ".join(f"{100 * chance(c):.1f}" for c in columns)
                     + " |" + " |" * 4)
    lines.append("")
    if tiny:
        lines += ["Columns: the CPU demo's held-out skills (lmms-eval through `mlcd_llava`, ChartQA's prompt, "
                  "generation settings and relaxed accuracy, in %, on playground images never seen in training). "
                  "The CPU study cannot run ChartQA, DocVQA, InfoVQA, OCRBench or MMMU (they need downloads); the "
                  "published numbers of the full-size towers these tiny ones stand for are, for reference only:", "",
                  "| published (full-size tower, real benchmarks) | " + " | ".join(COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        for tower in towers:
            published = published_row(tower.preset.name)
            if published:
                lines.append(f"| {published[0]} | " + " | ".join(_score(published[1][c], c) for c in COLUMNS) + " |")
        lines.append("")
    else:
        lines += ["Units: " + ", ".join(f"{c} {u}" for c, u in UNITS.items()) + ". Published rows: the MLCD README "
                  "(LLaVA-NeXT recipe, Qwen2.5-7B, LCS-558K + LLaVA-NeXT-Data, lmms-eval 0.2.0).", ""]
    lines += [f"- {note}" for note in notes]
    if settings_table:
        lines += ["", "## Evaluation settings across towers", "", settings_table.rstrip()]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def to_json(towers: list[StudyTower], facts: list[TowerFacts], *, tiny: bool, notes: list[str],
            warnings: list[str]) -> dict:
    rows = []
    for tower, fact in zip(towers, facts):
        published = published_row(tower.preset.name)
        rows.append({
            "tower": tower.key, "label": tower.label, "preset": tower.preset.name,
            "scores": fact.scores, "documents": fact.documents,
            "published": published[1] if published else None,
            "stages": {str(n): {"manifest_hash": s.manifest_hash, "tokens_per_s": s.tokens_per_s,
                                "visual_tokens_per_sample": s.visual_tokens.__dict__ if s.visual_tokens else None,
                                "wall_seconds": s.wall_seconds, "steps_sha256": s.steps_sha256}
                       for n, s in fact.stages.items()},
            "eval_seconds": fact.eval_seconds, "wall_seconds": fact.wall_seconds,
            "results_files": [str(p) for p in fact.results_files]})
    return {"tiny": tiny, "columns": columns_for(tiny), "rows": rows, "notes": notes, "warnings": warnings}


def plot(towers: list[StudyTower], facts: list[TowerFacts], out: Path, *, tiny: bool) -> list[Path]:
    """One bar chart per column: our score per tower, with the published one beside it (full-size towers) or the
    chance level (the CPU study's skills)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    labels = [t.label.replace(", tiny", "\n(tiny)").replace(" (", "\n(", 1) for t in towers]
    for column in columns_for(tiny):
        ours = [f.scores.get(column) for f in facts]
        if all(v is None for v in ours):
            continue
        published = [(published_row(t.preset.name) or (None, {}))[1].get(column) for t in towers]
        figure, axis = plt.subplots(figsize=(max(5.0, 1.6 * len(towers) + 1), 4.2), dpi=100)
        width = 0.38 if not tiny else 0.6
        positions = range(len(towers))
        axis.bar([p - (width / 2 if not tiny else 0) for p in positions], [v or 0 for v in ours], width,
                 label="ours", color="#3b6ea8")
        if not tiny and any(v is not None for v in published):
            axis.bar([p + width / 2 for p in positions], [v or 0 for v in published], width, label="published",
                     color="#c9a227")
        if tiny:
            from mlcd_vl.demo.playground import chance

            axis.axhline(100 * chance(column), color="grey", linestyle="--", linewidth=1, label="chance")
        for position, value in zip(positions, ours):
            if value is not None:
                axis.annotate(_score(value, column), (position - (width / 2 if not tiny else 0), value),
                              ha="center", va="bottom", fontsize=8)
        axis.set_ylim(0, 1000 if column == "OCRBench" else 100)
        axis.set_xticks(list(positions), labels, fontsize=8)
        unit = UNITS.get(column, "held-out accuracy, %")
        axis.set_ylabel(unit)
        axis.set_title(f"{column} ({unit})" + (": tiny towers on CPU" if tiny else ""))
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        path = out / f"{column}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def write(workdir: Path, towers: list[StudyTower], facts: list[TowerFacts], *, tiny: bool, notes: list[str],
          settings_table: str, warnings: list[str]) -> tuple[Path, list[Path]]:
    """study.md, study.json and plots/ in the study folder; returns (study.md, the plots)."""
    text = render(towers, facts, tiny=tiny, notes=notes, settings_table=settings_table, warnings=warnings)
    plots = plot(towers, facts, workdir / "plots", tiny=tiny)
    text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    (workdir / "study.md").write_text(text)
    (workdir / "study.json").write_text(json.dumps(to_json(towers, facts, tiny=tiny, notes=notes,
                                                           warnings=warnings), indent=1) + "\n")
    return workdir / "study.md", plots
