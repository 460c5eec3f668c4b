"""``policylab arena``: run several recipes side by side on the same task, model, budget and seeds, then
write ``arena/<name>/{runs/, plots/, summary.json, report.html}``.

Fairness: every run gets the same overrides (model, task, steps, and the spec's shared settings such as
group size and prompts per step), and seed s gives every recipe the same data order and the same initial
weights. Runs go one after another. A run is finished when its folder holds ``DONE`` (written after
training and the final evaluation); running the same arena again skips finished runs, resumes a run
that left a checkpoint, and restarts one that left none.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
# settings that make two arenas comparable; recipes and seeds may change between invocations
_FIXED_FIELDS = ("steps", "model", "task", "overrides", "eval_k", "eval_size", "eval_temperature",
                 "eval_max_new_tokens", "warmup")


class ArenaError(ValueError):
    """An arena that cannot run as asked; the message names the setting to change."""


@dataclass
class ArenaSpec:
    name: str
    recipes: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    model: str | None = None  # None: each recipe's own model (then runs may differ in model: avoid)
    task: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted recipe keys applied to every run
    eval_k: int = 0  # >0: the arena samples k completions per held-out prompt from each final model
    eval_size: int = 32  # held-out prompts for that evaluation
    eval_temperature: float = 1.0
    eval_max_new_tokens: int = 0  # 0: the run's rollout.max_new_tokens
    warmup: dict[str, Any] = field(default_factory=dict)  # {steps, batch_size, lr, seed}: one shared SFT warm-up

    def __post_init__(self):
        if not self.recipes:
            raise ArenaError("an arena needs at least one recipe")
        if not self.seeds:
            raise ArenaError("an arena needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ArenaError(f"arena seeds repeat: {self.seeds}")
        if self.steps < 1:
            raise ArenaError(f"arena steps must be >= 1, got {self.steps}")
        if self.eval_k < 0 or self.eval_size < 1:
            raise ArenaError("arena eval_k must be >= 0 and eval_size >= 1")
        unknown = set(self.warmup) - {"steps", "batch_size", "lr", "seed"}
        if unknown:
            raise ArenaError(f"arena warmup has unknown keys {sorted(unknown)} (valid: steps, batch_size, lr, seed)")

    def labels(self) -> list[tuple[str, str]]:
        """(label, recipe) pairs; a label is the recipe's file stem, made unique with -2, -3, ..."""
        out, seen = [], {}
        for recipe in self.recipes:
            stem = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
            seen[stem] = seen.get(stem, 0) + 1
            out.append((stem if seen[stem] == 1 else f"{stem}-{seen[stem]}", recipe))
        return out


# ----------------------------------------------------------------------------------------------
# presets


def available_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.exists():
        known = available_presets()
        if name_or_path not in known:
            from policylab.registry import suggest

            raise ArenaError(f"unknown arena preset {name_or_path!r}" + suggest(name_or_path, known))
        path = known[name_or_path]
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ArenaError(f"arena preset {path} must be a mapping")
    allowed = set(ArenaSpec.__dataclass_fields__)
    unknown = set(data) - allowed
    if unknown:
        raise ArenaError(f"arena preset {path} has unknown keys {sorted(unknown)} (valid: {', '.join(sorted(allowed))})")
    data.setdefault("name", path.stem)
    return data


# ----------------------------------------------------------------------------------------------
# running


def _check_spec(arena_dir: Path, spec: ArenaSpec) -> None:
    """Refuse to mix runs made under different settings in one arena folder."""
    saved_path = arena_dir / "arena.json"
    current = asdict(spec)
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        changed = [f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in _FIXED_FIELDS
                   if json.dumps(saved.get(key), sort_keys=True) != json.dumps(current[key], sort_keys=True)]
        if changed:
            raise ArenaError(f"arena {arena_dir} was run with other settings ({'; '.join(changed)}); "
                             "use another --name, or delete that folder")
        current["recipes"] = list(dict.fromkeys(saved.get("recipes", []) + spec.recipes))
        current["seeds"] = list(dict.fromkeys(saved.get("seeds", []) + spec.seeds))
    arena_dir.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(current, indent=1))


def run_overrides(spec: ArenaSpec, seed: int, model: str | None) -> dict[str, Any]:
    """The overrides every recipe gets for seed ``seed``: same budget, data order and start weights."""
    out = dict(spec.overrides)
    out["train.steps"] = spec.steps
    out["train.seed"] = seed
    if model:
        out["model.name"] = model
    if spec.task:
        out["task.name"] = spec.task
    return out


def _checkpoint_step(run_dir: Path) -> int | None:
    from policylab.train import checkpoint

    latest = checkpoint.latest(run_dir)
    return int(latest.name.split("-")[1]) if latest is not None else None


def run_arena(
    spec: ArenaSpec,
    root: str | Path = "arena",
    *,
    train_fn: Callable[..., Any] | None = None,
    evaluate_fn: Callable[[Path, ArenaSpec], dict] | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> Path:
    """Run every recipe x seed that is not finished yet, then write the summary, plots and report.

    ``train_fn(recipe, run_dir=..., resume=bool, **overrides)`` defaults to :func:`policylab.train`;
    ``evaluate_fn(run_dir, spec) -> dict`` to :func:`evaluate_run` (used when ``spec.eval_k > 0``).
    A run that raises is marked ``FAILED`` (with its traceback) and the arena goes on; the next
    invocation retries it. Ctrl-C stops the arena; finished runs stay finished.
    """
    if train_fn is None:
        from policylab import train as train_fn
    evaluate_fn = evaluate_fn or evaluate_run
    arena_dir = Path(root) / spec.name
    _check_spec(arena_dir, spec)
    model = prepare_start_model(spec, arena_dir, log) if spec.warmup else spec.model
    start_eval = arena_dir / "start_model" / "eval.json"
    if spec.eval_k and not start_eval.exists():
        # the "before RL" row: the warmed-up folder, or the model itself (by name) when there is no warm-up
        log("arena: evaluating the start model")
        result = evaluate_fn(arena_dir / "start_model" if spec.warmup else start_model_name(spec), spec)
        start_eval.parent.mkdir(parents=True, exist_ok=True)
        start_eval.write_text(json.dumps(result, indent=1))
    pairs = spec.labels()
    total = len(pairs) * len(spec.seeds)
    done_count = 0
    for seed in spec.seeds:  # seed-major: after each seed every recipe has a comparable result
        for label, recipe in pairs:
            done_count += 1
            run_dir = arena_dir / "runs" / f"{label}-seed{seed}"
            if (run_dir / "DONE").exists():
                log(f"arena [{done_count}/{total}] {label} seed {seed}: finished earlier, skipped")
                continue
            log(f"arena [{done_count}/{total}] {label} seed {seed}: training in {run_dir}")
            started = time.time()
            try:
                _run_one(recipe, run_dir, run_overrides(spec, seed, model), spec, train_fn, evaluate_fn)
            except KeyboardInterrupt:
                log(f"arena: interrupted during {label} seed {seed}; run the same command again to resume")
                raise
            except Exception as err:  # one broken recipe must not cost the other runs
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "FAILED").write_text(traceback.format_exc())
                log(f"arena: {label} seed {seed} failed: {type(err).__name__}: {err}")
                continue
            (run_dir / "DONE").write_text(json.dumps({"recipe": recipe, "seed": seed,
                                                      "seconds": round(time.time() - started, 1)}))
    report = write_report(arena_dir, spec)
    log(f"arena: report written to {report}")
    return arena_dir


def _run_one(recipe: str, run_dir: Path, overrides: dict, spec: ArenaSpec, train_fn, evaluate_fn) -> None:
    (run_dir / "FAILED").unlink(missing_ok=True)
    step = _checkpoint_step(run_dir) if run_dir.exists() else None
    if step is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a partial run without a checkpoint starts over
        train_fn(recipe, run_dir=run_dir, **overrides)
    elif step < spec.steps:
        train_fn(recipe, run_dir=run_dir, resume=True, **overrides)
    # else: training finished before the interruption; only the evaluation is missing
    if spec.eval_k:
        result = evaluate_fn(run_dir, spec)
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------
# the start model and the final evaluation


def prepare_start_model(spec: ArenaSpec, arena_dir: Path, log=print) -> str:
    """A supervised warm-up of ``spec.model`` on the task's training split, done once and shared by every
    run (so RL starts from a model with non-zero accuracy and identical weights for all recipes)."""
    from policylab import models
    from policylab.config import load_recipe
    from policylab.registry import build
    from policylab.models.warmup import supervised_warmup

    folder = arena_dir / "start_model"
    if (folder / "config.json").exists():
        return str(folder)
    warm = {"steps": 200, "batch_size": 64, "lr": 3e-3, "seed": 0, **spec.warmup}
    recipe = load_recipe(spec.recipes[0], run_overrides(spec, warm["seed"], spec.model))
    task = build("task", recipe.task.name, recipe.task.params, where="task")()
    log(f"arena: supervised warm-up of {recipe.model.name} for {warm['steps']} steps on {task.name}")
    model, tokenizer = models.load(recipe.model.name, recipe.model.dtype, "cpu", tiny=recipe.model.tiny, seed=warm["seed"])
    supervised_warmup(model, tokenizer, task.train, steps=warm["steps"], batch_size=warm["batch_size"], lr=warm["lr"],
                      seed=warm["seed"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return str(folder)


def start_model_name(spec: ArenaSpec) -> str:
    """The model every run starts from when there is no warm-up: the arena's, else the first recipe's."""
    if spec.model:
        return spec.model
    from policylab.config import load_recipe

    return load_recipe(spec.recipes[0], run_overrides(spec, spec.seeds[0], None)).model.name


def evaluate_run(run_dir: Path | str, spec: ArenaSpec) -> dict:
    """Evaluate the model in ``run_dir`` (its latest checkpoint, or the folder itself when it is a model
    folder) on the held-out split of the arena's task with ``spec.eval_k`` samples per prompt. A string
    that is not a folder is a model name (the start model without a warm-up: built-in name or hub id)."""
    if isinstance(run_dir, str) and not Path(run_dir).is_dir():
        return _evaluate_model_name(run_dir, spec)
    from policylab.config import load_recipe
    from policylab.train import checkpoint

    run_dir = Path(run_dir)
    latest = checkpoint.latest(run_dir)
    model_dir = latest if latest is not None else run_dir
    if not (model_dir / "config.json").exists():
        raise ArenaError(f"no model to evaluate in {run_dir} (no checkpoint, no config.json)")
    config = run_dir / "config.yaml"
    recipe = load_recipe(str(config)) if config.exists() else load_recipe(spec.recipes[0], run_overrides(spec, 0, None))
    return _evaluate_recipe_model(recipe, spec, str(model_dir))


def _evaluate_model_name(name: str, spec: ArenaSpec) -> dict:
    from policylab.config import load_recipe

    # the first seed's recipe: for `tiny` (random weights per seed) this is seed spec.seeds[0]'s start
    recipe = load_recipe(spec.recipes[0], run_overrides(spec, spec.seeds[0], name))
    return _evaluate_recipe_model(recipe, spec, recipe.model.name, tiny=recipe.model.tiny, seed=recipe.train.seed)


def _evaluate_recipe_model(recipe, spec: ArenaSpec, model_ref: str, **load_kwargs) -> dict:
    from policylab import models
    from policylab.eval.evaluate import evaluate, primary_reward, recipe_engine
    from policylab.registry import build

    task = build("task", recipe.task.name, recipe.task.params, where="task")()
    rows = task.eval[: spec.eval_size]
    if not rows:
        raise ArenaError(f"task {task.name!r} has no held-out rows to evaluate on")
    model, tokenizer = models.load(model_ref, recipe.model.dtype, "cuda" if _cuda() else "cpu", **load_kwargs)
    engine = recipe_engine(recipe, model, tokenizer)
    try:
        return evaluate(model, tokenizer, rows, primary_reward(recipe), k=spec.eval_k, temperature=spec.eval_temperature,
                        max_new_tokens=spec.eval_max_new_tokens or recipe.rollout.max_new_tokens, seed=0, engine=engine)
    finally:
        engine.close()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# summary and report


def write_report(arena_dir: Path, spec: ArenaSpec) -> Path:
    """summary.json, plots/*.png and report.html for the runs of ``spec`` found in ``arena_dir``."""
    from policylab.eval.report import make_plots, write_html
    from policylab.eval.summary import read_run, summarize

    pairs = spec.labels()
    runs = [read_run(label, recipe, seed, arena_dir / "runs" / f"{label}-seed{seed}")
            for seed in spec.seeds for label, recipe in pairs]
    labels = [label for label, _ in pairs]
    summary = summarize(runs, labels)
    start_eval = arena_dir / "start_model" / "eval.json"
    if start_eval.exists():
        summary["start_model"] = json.loads(start_eval.read_text())
    summary["arena"] = asdict(spec)
    (arena_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    start = summary.get("start_model") or {}
    start_curve = {int(k[5:]): v for k, v in start.items() if k.startswith("pass@") and k[5:].isdigit()}
    plots = make_plots(runs, labels, arena_dir / "plots", start_curve)
    descriptions = {}
    for label, recipe in pairs:
        try:
            from policylab.config import load_raw

            descriptions[label] = str(load_raw(recipe).get("description", ""))
        except Exception:  # a description is decoration; a recipe that no longer loads still gets a row
            descriptions[label] = ""
    settings = {k: v for k, v in asdict(spec).items() if v not in ({}, None)}
    return write_html(arena_dir / "report.html", settings, summary, plots, descriptions)


# ----------------------------------------------------------------------------------------------
# command line


def arena_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="policylab arena", description="run recipes side by side (same task, model, "
                                "budget and seeds) and write arena/<name>/report.html")
    p.add_argument("recipes", nargs="*", metavar="RECIPE", help="recipe names or YAML paths; the first is the baseline")
    p.add_argument("--preset", help=f"a preset ({', '.join(available_presets()) or 'none'}) or a preset YAML; "
                   "flags override its values")
    p.add_argument("--name", help="arena folder name (default: the preset name or the recipe names)")
    p.add_argument("--task")
    p.add_argument("--model")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int, help="K seeds: 0..K-1")
    p.add_argument("--seed-list", help="explicit seeds, comma separated")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override applied to every run, e.g. rollout.group_size=4 (repeatable)")
    p.add_argument("--eval-k", type=int, help="samples per held-out prompt for the final pass@k evaluation (0: off)")
    p.add_argument("--eval-size", type=int, help="held-out prompts for that evaluation")
    p.add_argument("--warmup-steps", type=int, help="shared supervised warm-up of the start model (0: off)")
    p.add_argument("--out", default="arena", help="parent folder of arenas (default: ./arena)")
    p.add_argument("--report-only", action="store_true", help="rewrite summary and report from existing runs")
    return p


def spec_from_args(args) -> ArenaSpec:
    from policylab.config import parse_override

    data: dict[str, Any] = load_preset(args.preset) if args.preset else {}
    if args.recipes:
        data["recipes"] = list(args.recipes)
    for flag, key in (("task", "task"), ("model", "model"), ("steps", "steps"), ("eval_k", "eval_k"),
                      ("eval_size", "eval_size")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    if args.seed_list:
        data["seeds"] = [int(s) for s in args.seed_list.split(",") if s.strip()]
    elif args.seeds is not None:
        data["seeds"] = list(range(args.seeds))
    if args.warmup_steps is not None:
        data["warmup"] = {**data.get("warmup", {}), "steps": args.warmup_steps} if args.warmup_steps else {}
    overrides = dict(data.get("overrides") or {})
    overrides.update(parse_override(o) for o in args.set)
    data["overrides"] = overrides
    if not data.get("recipes"):
        raise ArenaError("name at least one recipe (or a --preset)")
    if not args.name and not data.get("name"):
        model = Path(str(data.get("model") or "default")).name
        data["name"] = "-vs-".join(Path(r).stem for r in data["recipes"]) + f"-{model}-{data.get('steps', 20)}steps"
    if args.name:
        data["name"] = args.name
    return ArenaSpec(**data)


def main_arena(argv: list[str]) -> int:
    from policylab.models import quiet_transformers

    quiet_transformers()
    args = arena_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if not args.report_only:
            from policylab.config import load_recipe

            for recipe in spec.recipes:  # fail on a typo before hours of training
                load_recipe(recipe, run_overrides(spec, spec.seeds[0], spec.model))
            arena_dir = run_arena(spec, args.out)
        else:
            arena_dir = Path(args.out) / spec.name
            if not arena_dir.exists():
                raise ArenaError(f"--report-only: {arena_dir} does not exist")
            write_report(arena_dir, spec)
    except (ArenaError, ValueError, KeyError) as err:
        print(f"policylab arena: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    summary = json.loads((arena_dir / "summary.json").read_text())
    for line in summary.get("headlines", []):
        print(line)
    print(f"report: {arena_dir / 'report.html'}")
    return 0

