"""`mlcd-vl study RECIPES --towers a,b,c`: the encoder study, one command from recipes to the table.

For each tower, in order: stage 1 and stage 2 of the recipes through the launchers a single run uses
(`scripts/pretrain.sh`, `scripts/finetune.sh` with NUM_GPUS and RECIPE), then lmms-eval with the `mlcd_llava`
adapter (`scripts/eval.sh`); every tower gets the same recipes, data, seed, overrides and evaluation, and only the
tower and its own image settings change (`study.towers`). Then one table in the MLCD table's format with the
published rows beside ours, visual tokens per sample, training tokens/s, wall time and the data manifests' hashes
(`study.md`, `study.json`) and a bar chart per benchmark (`plots/`). Examples:

    mlcd-vl study configs/recipes/mlcd_bigG448 --towers all --allow-pickle \\
        --stage1-set data.preset_dir=/data/LLaVA-Pretrain --stage2-set data.preset_dir=/data/LLaVA-NeXT-Data
                                                                     # 8 GPUs per tower (NUM_GPUS as the scripts)
    mlcd-vl study --tiny                                             # the CPU study: three tiny tower families
    mlcd-vl study --towers clip-vitL-336,mlcd-bigG-448 --dry-run     # what would run, and what is done

RECIPES: PREFIX for `PREFIX_stage1.yaml` and `PREFIX_stage2.yaml`, a folder with one `*stage1*.yaml` and one
`*stage2*.yaml`, or `STAGE1.yaml,STAGE2.yaml`; the default is `configs/recipes/mlcd_bigG448` (with --tiny, the demo's
recipes, `mlcd_vl/demo/recipes`).

Resuming: a second invocation redoes nothing that is finished (`study.ledger`: a stamp written after a step's outputs
are all there; an interrupted stage continues from its newest checkpoint when its recipe says `resume: latest`), and
refuses steps finished with other settings. Data: each stage's data manifest must be the same for every tower
(checked before a stage starts and again before the table); `--allow-different-data` compares anyway, and says so.

The CPU study (`--tiny`) runs the same steps on tiny random towers of three families (MLCD RoPE2D, CLIP QuickGELU,
SigLIP without CLS; `TowerPreset.shrunk`), the demo's tiny LLM and playground data, and scores the demo's held-out
skills with lmms-eval instead of the five benchmarks (which need downloads).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlcd_vl.errors import UserError
from mlcd_vl.study.towers import TOWER_KEYS, StudyError, StudyTower, parse_towers

DEFAULT_WORKDIR = Path("runs") / "study"
DEFAULT_TASKS = "chartqa,docvqa_val,infovqa_val,ocrbench,mmmu_val"
STAGE_NAMES = {1: "stage1", 2: "stage2"}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="?", default=None,
                        help="PREFIX (PREFIX_stage1.yaml, PREFIX_stage2.yaml), a folder with one *stage1*.yaml and "
                             "one *stage2*.yaml, or STAGE1.yaml,STAGE2.yaml (default: configs/recipes/mlcd_bigG448; "
                             "with --tiny the demo's recipes)")
    parser.add_argument("--towers", default=None,
                        help="comma-separated tower presets, or `all` (default: the six of the MLCD table; with "
                             "--tiny: mlcd-bigG-448,clip-vitL-336,siglip-so400m-384)")
    parser.add_argument("--tiny", action="store_true",
                        help="the CPU study: tiny random towers of the named families, the demo's tiny LLM, "
                             "playground data and held-out skills (no downloads)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"the study folder (default {DEFAULT_WORKDIR}, or {DEFAULT_WORKDIR}-tiny with --tiny)")
    parser.add_argument("--set", dest="both", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for both stages of every tower (e.g. data.num_workers=8)")
    parser.add_argument("--stage1-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides for stage 1 of every tower (e.g. data.train=... data.image_folder=...)")
    parser.add_argument("--stage2-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides for stage 2 of every tower")
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="processes per node for training and evaluation (default: $NUM_GPUS, else 8; 1 with "
                             "--tiny); NNODES, MASTER_ADDR, HOSTFILE... pass through to the launch scripts")
    parser.add_argument("--launcher", choices=("auto", "scripts", "module"), default="auto",
                        help="scripts: scripts/pretrain.sh and finetune.sh, as a single run; module: python -m "
                             "mlcd_vl.train (one process); auto: scripts in a repository checkout")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help=f"lmms-eval tasks (default {DEFAULT_TASKS}; --tiny: the demo's held-out skills)")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="offline benchmark folder for scripts/eval.sh (MLCD_VL_EVAL_DATA)")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="requests per generate call (default 1 as upstream; 32 with --tiny)")
    parser.add_argument("--eval-model-args", default=None,
                        help="extra mlcd_llava model_args for every tower (MLCD_VL_EVAL_MODEL_ARGS; default: none)")
    parser.add_argument("--allow-different-data", action="store_true",
                        help="compare towers whose stages saw different data manifests (the table says so)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="let DFN5B's pickle-only OpenCLIP weights be read (weights_only) and converted")
    parser.add_argument("--visual-token-sample", type=int, default=2000,
                        help="records measured for visual tokens per sample (default 2000; all when fewer)")
    parser.add_argument("--dry-run", action="store_true", help="print each step, its overrides and whether it is "
                                                                "done; run nothing")
    from mlcd_vl.demo.plan import PLANS  # sizes only: no torch at --help time

    sizes = "; ".join(f"{name}: {p.stage1_steps} + {p.stage2_steps} steps, {p.train_images} training images, "
                      f"{p.heldout_per_skill} held-out per skill" for name, p in PLANS.items())
    tiny = parser.add_argument_group("the CPU study (--tiny)")
    tiny.add_argument("--plan", choices=tuple(PLANS), default="quick",
                      help=f"the demo's run sizes ({sizes}; default: quick)")
    tiny.add_argument("--train-images", type=int, default=None, help="playground training images (default: the plan's)")
    tiny.add_argument("--heldout-per-skill", type=int, default=None,
                      help="held-out items per skill (default: the plan's)")
    tiny.add_argument("--stage1-steps", type=int, default=None, help="stage-1 optimizer steps (default: the plan's)")
    tiny.add_argument("--stage2-steps", type=int, default=None, help="stage-2 optimizer steps (default: the plan's)")
    tiny.add_argument("--threads", type=int, default=None, help="torch threads per process (default OMP_NUM_THREADS, "
                                                                 "else 2)")
    tiny.add_argument("--seed", type=int, default=0, help="playground data seed")


# ---------------------------------------------------------------------------------------------------- the inputs


def resolve_recipes(text: str | None, tiny: bool) -> tuple[Path, Path]:
    from mlcd_vl.demo.stages import RECIPES, REPO

    if text is None:
        folder = RECIPES if tiny else REPO / "configs" / "recipes"
        pair = (folder / "demo_stage1.yaml", folder / "demo_stage2.yaml") if tiny else \
            (folder / "mlcd_bigG448_stage1.yaml", folder / "mlcd_bigG448_stage2.yaml")
    elif "," in text:
        first, second = (part.strip() for part in text.split(",", 1))
        pair = (Path(first), Path(second))
    elif not Path(text).is_dir() and Path(f"{text}_stage1.yaml").is_file():
        pair = (Path(f"{text}_stage1.yaml"), Path(f"{text}_stage2.yaml"))
    else:
        folder = Path(text)
        if not folder.is_dir():
            raise StudyError(f"{text}: not a folder or a recipe pair; give a folder with one *stage1*.yaml and one "
                             "*stage2*.yaml, PREFIX for PREFIX_stage1.yaml and PREFIX_stage2.yaml, or "
                             "STAGE1.yaml,STAGE2.yaml")
        found = [sorted(folder.glob(f"*stage{n}*.yaml")) for n in (1, 2)]
        if any(len(f) != 1 for f in found):
            listed = "; ".join(f"stage {n}: {', '.join(p.name for p in f) or 'none'}" for n, f in zip((1, 2), found))
            raise StudyError(f"{folder}: needs exactly one *stage1*.yaml and one *stage2*.yaml ({listed}); name "
                             "the pair as PREFIX (PREFIX_stage1.yaml, PREFIX_stage2.yaml) or STAGE1.yaml,STAGE2.yaml")
        pair = (found[0][0], found[1][0])
    for path in pair:
        if not path.is_file():
            raise StudyError(f"{path}: recipe not found")
    return pair[0].resolve(), pair[1].resolve()


def _check_overrides(values: list[str], option: str) -> None:
    for value in values:
        key = value.split("=", 1)[0].strip().removeprefix("--")
        if "=" not in value:
            raise StudyError(f"{option} {value!r}: an override looks like section.key=value")
        if key in TOWER_KEYS:
            raise StudyError(f"{option} {value!r}: the study sets {key} per tower ({', '.join(TOWER_KEYS)}); "
                             "everything else is the same for every tower")


@dataclass
class TinyInputs:
    """The CPU study's shared inputs: playground data and the tiny LLM (one for every tower)."""

    data: object  # demo.playground.PlaygroundData
    llm: Path
    plan: object  # demo.plan.DemoPlan


def tiny_plan(args: argparse.Namespace):
    from mlcd_vl.demo.plan import PLANS, DemoPlan

    plan = PLANS[args.plan]
    changes = {name: getattr(args, name) for name in ("train_images", "heldout_per_skill", "stage1_steps",
                                                      "stage2_steps") if getattr(args, name) is not None}
    return DemoPlan(**{**plan.__dict__, **changes})


def prepare_tiny(workdir: Path, plan, seed: int, towers: list[StudyTower]) -> TinyInputs:
    """Playground data, the tiny LLM and one tiny tower per family under the study folder; what is already there is
    reused (data written with other sizes or seed is an error: the finished towers trained on it)."""
    from mlcd_vl.demo.plan import demo_shapes
    from mlcd_vl.demo.playground import read_playground, write_playground
    from mlcd_vl.model import tiny

    data_dir = workdir / "data"
    wanted = {"seed": seed, "train_images": plan.train_images, "heldout_per_skill": plan.heldout_per_skill}
    if (data_dir / "playground.json").is_file():
        found = json.loads((data_dir / "playground.json").read_text())
        if {k: found.get(k) for k in wanted} != wanted:
            raise StudyError(f"{data_dir} holds playground data of other sizes or seed "
                             f"({ {k: found.get(k) for k in wanted} } vs {wanted}); use another --workdir")
    else:
        print(f"writing the playground data to {data_dir}", flush=True)
        write_playground(data_dir, seed=seed, **{k: v for k, v in wanted.items() if k != "seed"})
    data = read_playground(data_dir)  # the tokenizer trains on the corpus as read back, so a rerun gets the same
    shapes = demo_shapes()
    llm = workdir / "assets" / "llm"
    if not (llm / "config.json").is_file():
        tiny.write_tiny_llm(llm, tiny.train_tokenizer(data.corpus + tiny.default_corpus()), shapes, seed=0)
    for tower in towers:
        folder = tiny_tower_folder(workdir, tower)
        if not (folder / "config.json").is_file():
            tiny.write_preset_tower(folder, tower.tiny, shapes, seed=1)
    return TinyInputs(data, llm, plan)


def tiny_tower_folder(workdir: Path, tower: StudyTower) -> Path:
    return workdir / "assets" / f"tower-{tower.key}"


# ---------------------------------------------------------------------------------------------------- the steps


@dataclass
class Step:
    tower: StudyTower
    kind: str  # stage1 | stage2 | eval
    folder: Path
    settings: dict
    recipe: Path | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def stage(self) -> int:
        return {"stage1": 1, "stage2": 2}.get(self.kind, 0)


@contextlib.contextmanager
def step_command(step: Step):
    """A step's command that failed (demo.stages raises RuntimeError naming its log) as a one-line user error."""
    try:
        yield
    except RuntimeError as error:
        raise UserError(f"{step.tower.key} {step.kind}: {error}") from error


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Study:
    """The steps of one study and how to run, resume and report them."""

    def __init__(self, args: argparse.Namespace):
        from mlcd_vl.demo.stages import REPO, default_launcher

        self.args = args
        self.tiny = args.tiny
        self.recipes = resolve_recipes(args.recipes, args.tiny)
        self.towers = parse_towers(args.towers, args.tiny)
        default = DEFAULT_WORKDIR.with_name("study-tiny") if args.tiny else DEFAULT_WORKDIR
        self.workdir = Path(args.workdir or default).expanduser().resolve()
        for option, values in (("--set", args.both), ("--stage1-set", args.stage1_set),
                               ("--stage2-set", args.stage2_set)):
            _check_overrides(values, option)
        self.launcher = default_launcher(args.launcher)
        self.launch_dir = REPO if self.launcher == "scripts" else Path.cwd()
        self.num_gpus = args.num_gpus or (1 if args.tiny else int(os.environ.get("NUM_GPUS") or 8))
        if self.num_gpus > 1 and self.launcher == "module":
            raise StudyError(f"--num-gpus {self.num_gpus} needs the launch scripts (--launcher scripts); "
                             "`python -m mlcd_vl.train` is one process")
        self.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 2)
        self.plan = tiny_plan(args) if args.tiny else None
        self.inputs: TinyInputs | None = None
        needs_pickle = [t.key for t in self.towers if t.preset.source_format == "open_clip" and not t.tiny]
        if needs_pickle and not args.allow_pickle:
            raise StudyError(f"{', '.join(needs_pickle)}: the hub weights are OpenCLIP pickle files; pass "
                             "--allow-pickle to read them (weights only) and convert them once to safetensors")

    # -------------------------------------------------------------------------------------------- the plan

    def env(self) -> dict:
        from mlcd_vl.demo.stages import REPO, child_env

        if self.tiny:
            return child_env(self.threads)
        env = dict(os.environ)
        path = env.get("PYTHONPATH", "")
        if str(REPO) not in path.split(os.pathsep):
            env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
        return env

    def tower_dir(self, tower: StudyTower) -> Path:
        return self.workdir / tower.key

    def inputs_overrides(self, stage: int) -> list[str]:
        if not self.tiny:
            return []
        data_dir, llm = self.workdir / "data", self.workdir / "assets" / "llm"
        plan = self.plan
        common = [f"model.llm={llm}", f"data.image_folder={data_dir / 'images'}"]
        if stage == 1:
            return [*common, f"data.train={data_dir / 'captions.json'}", f"optim.max_steps={plan.stage1_steps}"]
        return [*common, f"data.train={data_dir / 'chat.json'}", f"optim.max_steps={plan.stage2_steps}",
                f"batch.per_device_batch_size={plan.batch_size}"]

    def stage_step(self, tower: StudyTower, stage: int) -> Step:
        folder = self.tower_dir(tower) / STAGE_NAMES[stage]
        recipe = self.recipes[stage - 1]
        user = [*self.args.both, *(self.args.stage1_set if stage == 1 else self.args.stage2_set)]
        source = tiny_tower_folder(self.workdir, tower) if tower.tiny else None
        overrides = [*self.inputs_overrides(stage), *user,
                     *tower.overrides(stage, source, allow_pickle=self.args.allow_pickle), f"output_dir={folder}"]
        if stage == 2:
            overrides.append(f"model.init_from={self.tower_dir(tower) / STAGE_NAMES[1]}")
        from mlcd_vl.study.ledger import portable

        settings = {"recipe": recipe.name, "recipe_sha256": _sha256(recipe),
                    "overrides": portable(overrides, self.workdir), "num_gpus": self.num_gpus}
        return Step(tower, STAGE_NAMES[stage], folder, settings, recipe, overrides)

    def eval_tasks(self) -> list[str]:
        if self.tiny:
            from mlcd_vl.demo.playground import SKILLS
            from mlcd_vl.demo.stages import LMMS_TASK_PREFIX

            return [f"{LMMS_TASK_PREFIX}{skill}" for skill in SKILLS]
        return [t.strip() for t in self.args.tasks.split(",") if t.strip()]

    def eval_batch_size(self) -> int:
        return self.args.eval_batch_size or (self.plan.eval_batch_size if self.tiny else 1)

    def eval_step(self, tower: StudyTower) -> Step:
        settings = {"tasks": self.eval_tasks(), "batch_size": self.eval_batch_size(),
                    "model_args": self.args.eval_model_args or "", "num_gpus": 1 if self.tiny else self.num_gpus,
                    "eval_data": str(self.args.eval_data) if self.args.eval_data else None}
        if self.tiny:
            settings["heldout_per_skill"] = self.plan.heldout_per_skill
        return Step(tower, "eval", self.tower_dir(tower) / "eval", settings)

    def steps(self, tower: StudyTower) -> list[Step]:
        return [self.stage_step(tower, 1), self.stage_step(tower, 2), self.eval_step(tower)]

    # -------------------------------------------------------------------------------------------- running

    def run_all(self) -> None:
        from mlcd_vl.study.ledger import STAMP, finished

        if self.tiny:
            self.inputs = prepare_tiny(self.workdir, self.plan, self.args.seed, self.towers)
        for tower in self.towers:
            redo = False  # once a step runs, the steps after it run too (they start from its output)
            for step in self.steps(tower):
                kind = "eval" if step.kind == "eval" else "stage"
                if not redo and finished(step.folder, kind, step.settings) is not None:
                    print(f"study: {tower.key} {step.kind}: finished earlier ({step.folder}), not redone", flush=True)
                    continue
                redo = True
                (step.folder / STAMP).unlink(missing_ok=True)
                print(f"\n=== study: {tower.key} ({tower.label}): {step.kind} -> {step.folder} ===", flush=True)
                if step.kind == "eval":
                    self.run_eval(step)
                else:
                    self.check_data(step)
                    self.run_stage(step)

    def finished_stamps(self, kind: str) -> dict[str, dict]:
        """{tower key: stamp} of the towers whose `kind` step is finished (stamps only: settings checked later)."""
        from mlcd_vl.study.ledger import STAMP

        stamps = {}
        for tower in self.towers:
            path = self.tower_dir(tower) / kind / STAMP
            if path.is_file():
                stamps[tower.key] = json.loads(path.read_text())
        return stamps

    def check_data(self, step: Step) -> None:
        """Before a stage trains: its data manifest must be the one the same stage of finished towers saw."""
        from mlcd_vl.data.cache import resolve_cache_dir
        from mlcd_vl.data.manifest import Manifest, build_manifest, diff
        from mlcd_vl.train.config import load_config

        others = {k: s for k, s in self.finished_stamps(step.kind).items() if k != step.tower.key}
        if not others:
            return
        with contextlib.chdir(self.launch_dir):
            config = load_config(step.recipe, step.overrides)
            now = build_manifest(config.data.train, config.data.image_folder, seed=config.seed,
                                 preset_dir=config.data.preset_dir,
                                 cache_dir=resolve_cache_dir(config.data.cache_dir))
        key, stamp = next(iter(others.items()))
        if now.hash == stamp["manifest_hash"]:
            return
        lines = diff(Manifest.load(self.workdir / key / step.kind / "data_manifest.json"), now)
        message = (f"{step.tower.key} {step.kind} would train on other data than {key} {step.kind} did: "
                   + "; ".join(lines or ["manifest hashes differ"]))
        if not self.args.allow_different_data:
            raise StudyError(message + "; pass --allow-different-data to compare them anyway")
        print(f"warning: {message} (--allow-different-data)", flush=True)

    def run_stage(self, step: Step) -> None:
        from mlcd_vl.demo.stages import launch_training
        from mlcd_vl.study import facts
        from mlcd_vl.study.ledger import mark_finished

        logs = self.tower_dir(step.tower) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with step_command(step):
            launch_training(step.stage, step.recipe, step.overrides, self.launcher, self.env(),
                            logs / f"{step.kind}.log", num_gpus=self.num_gpus)
        seconds = time.perf_counter() - start
        visual = facts.visual_tokens_per_sample(step.folder, self.launch_dir, self.args.visual_token_sample)
        world_size = self.num_gpus * int(os.environ.get("NNODES") or 1)
        mark_finished(step.folder, "stage", step.settings, wall_seconds=seconds,
                      manifest_hash=facts.manifest_hash(step.folder),
                      tokens_per_s=facts.training_tokens_per_s(step.folder / "metrics.jsonl"),
                      visual_tokens=visual.__dict__, launch_dir=str(self.launch_dir),
                      steps_sha256=facts.step_membership_sha256(step.folder, world_size))

    def run_eval(self, step: Step) -> None:
        from mlcd_vl.demo.stages import REPO, evaluate, run_logged
        from mlcd_vl.study.ledger import mark_finished

        tower_dir = self.tower_dir(step.tower)
        model = tower_dir / STAGE_NAMES[2]
        (tower_dir / "logs").mkdir(parents=True, exist_ok=True)
        start, wall = time.time(), time.perf_counter()
        if self.tiny:
            with step_command(step):
                evaluate(model, self.inputs.data.heldout, tower_dir, self.eval_batch_size(), self.env())
        else:
            script = REPO / "scripts" / "eval.sh"
            if not script.is_file():
                raise StudyError(f"{script} not found: the study evaluates through scripts/eval.sh (a checkout)")
            env = dict(self.env(), PYTHON=sys.executable)
            if self.args.eval_data:
                env["MLCD_VL_EVAL_DATA"] = str(self.args.eval_data.resolve())
            if self.args.eval_model_args:
                env["MLCD_VL_EVAL_MODEL_ARGS"] = self.args.eval_model_args
            with step_command(step):
                run_logged(["bash", str(script), str(model), ",".join(self.eval_tasks()), str(self.num_gpus),
                            str(self.eval_batch_size()), str(step.folder)], env, tower_dir / "logs" / "eval.log")
        seconds = time.perf_counter() - wall
        results = sorted(p for p in step.folder.rglob("*_results.json") if p.stat().st_mtime >= start - 1)
        mark_finished(step.folder, "eval", step.settings, wall_seconds=seconds,
                      results_files=[str(p.relative_to(step.folder)) for p in results])

    # -------------------------------------------------------------------------------------------- reporting

    def show(self) -> None:
        """--dry-run: each step, what it runs and whether it is finished."""
        from mlcd_vl.study.ledger import STAMP

        print(f"study folder {self.workdir}; recipes {self.recipes[0]}, {self.recipes[1]}; launcher {self.launcher}, "
              f"{self.num_gpus} process(es) per node")
        for tower in self.towers:
            print(f"\n{tower.key} ({tower.label}):")
            for step in self.steps(tower):
                done = "finished" if (step.folder / STAMP).is_file() else "to run"
                if step.kind == "eval":
                    print(f"  eval [{done}]: tasks {','.join(step.settings['tasks'])}, batch size "
                          f"{step.settings['batch_size']} -> {step.folder}")
                else:
                    print(f"  {step.kind} [{done}]: RECIPE={step.recipe} NUM_GPUS={self.num_gpus} "
                          f"scripts/{'pretrain.sh' if step.stage == 1 else 'finetune.sh'} {' '.join(step.overrides)}")

    def report(self) -> int:
        from mlcd_vl.eval import compare
        from mlcd_vl.study import report
        from mlcd_vl.study.facts import StageFacts, TowerFacts, VisualTokens, scores_of
        from mlcd_vl.study.ledger import finished

        all_facts, warnings, rows = [], [], []
        for tower in self.towers:
            stamps = {step.kind: finished(step.folder, "eval" if step.kind == "eval" else "stage", step.settings)
                      for step in self.steps(tower)}
            stages = {n: StageFacts(s["manifest_hash"], s.get("tokens_per_s"),
                                    VisualTokens(**s["visual_tokens"]) if s.get("visual_tokens") else None,
                                    s["wall_seconds"], s.get("steps_sha256"))
                      for n, s in ((1, stamps["stage1"]), (2, stamps["stage2"]))}
            eval_folder = self.tower_dir(tower) / "eval"
            files = [eval_folder / f for f in stamps["eval"]["results_files"]]
            scores, documents, found = scores_of(eval_folder, files)
            warnings += [f"{tower.key}: {w}" for w in found]
            all_facts.append(TowerFacts(tower.key, tower.label, stages, stamps["eval"]["wall_seconds"], scores,
                                        documents, files))
            rows.append(compare.row_settings(files, tower.key))
        notes, refused = self.data_notes(all_facts)
        if refused:
            for line in refused:
                print(f"mlcd-vl study: {line}", file=sys.stderr)
            print("mlcd-vl study: error: the towers' runs saw different data; no table written (pass "
                  "--allow-different-data to compare them anyway)", file=sys.stderr)
            return 1
        warnings = compare.compare(rows) + warnings
        notes.append(f"Recipes `{self.recipes[0].name}`, `{self.recipes[1].name}`; per tower only `model.tower` and, "
                     "in stage 2, `model.pinpoints` (the preset's 5-crop grid at its crop size) change; crop size, "
                     "resize, mean/std, feature layer and CLS handling follow the tower. Same seed, overrides and "
                     "evaluation for every tower" + (f" (common overrides: {' '.join(self.common_overrides())})"
                                                     if self.common_overrides() else "") + ".")
        path, plots = report.write(self.workdir, self.towers, all_facts, tiny=self.tiny, notes=notes,
                                   settings_table=compare.render_differences(rows), warnings=warnings)
        print("\n" + path.read_text().split("\n## Plots")[0])
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"study: {path}, {path.with_suffix('.json')}; plots: {', '.join(str(p) for p in plots)}")
        return 0

    def common_overrides(self) -> list[str]:
        return [*self.args.both, *(f"(stage 1) {v}" for v in self.args.stage1_set),
                *(f"(stage 2) {v}" for v in self.args.stage2_set)]

    def data_notes(self, all_facts: list) -> tuple[list[str], list[str]]:
        """(notes for the table, differences that refuse it): each stage's manifest must be one for all towers."""
        from mlcd_vl.study.facts import manifest_differences

        notes, refused = [], []
        for stage in (1, 2):
            steps = {f.key: f.stages[stage].steps_sha256 for f in all_facts}
            if None in steps.values():
                notes.append(f"Stage {stage} order: packed rows follow each tower's own token counts.")
            elif len(set(steps.values())) == 1:
                notes.append(f"Stage {stage} order: the same records in every optimizer step for every tower "
                             f"(`{next(iter(steps.values()))[:12]}`; within a step, micro-batches follow each tower's "
                             "token counts).")
            else:
                groups = {h: [k for k, v in steps.items() if v == h] for h in steps.values()}
                notes.append(f"Stage {stage} order: the optimizer steps hold different records for different towers ("
                             + "; ".join(f"{', '.join(keys)}: `{h[:12]}`" for h, keys in groups.items())
                             + "): some records were left out for some towers (see each run's data_problems.json).")
            hashes = {f.key: f.stages[stage].manifest_hash for f in all_facts}
            if len(set(hashes.values())) == 1:
                notes.append(f"Stage {stage} data: one manifest for every tower, `{next(iter(hashes.values()))}`.")
                continue
            first = all_facts[0].key
            for key, value in hashes.items():
                if value != hashes[first]:
                    lines = manifest_differences(self.workdir / first / STAGE_NAMES[stage],
                                                 self.workdir / key / STAGE_NAMES[stage])
                    text = f"stage {stage} data of {key} differs from {first}'s: " + "; ".join(lines or ["hash"])
                    (notes if self.args.allow_different_data else refused).append(
                        text + (" (compared anyway: --allow-different-data)" if self.args.allow_different_data
                                else ""))
        return notes, refused


def run(args: argparse.Namespace) -> int:
    """Errors a user can act on (StudyError, ConfigError, a failed step naming its log) are `errors.UserError`s,
    reported in one line by the CLI."""
    study = Study(args)
    if args.dry_run:
        study.show()
        return 0
    from transformers.utils import logging as hf_logging

    from mlcd_vl.console import quiet_deepspeed_cpu_notice

    hf_logging.disable_progress_bar()
    quiet_deepspeed_cpu_notice()  # this process only reads runs (the stages log DeepSpeed's own notices)
    study.run_all()
    return study.report()
