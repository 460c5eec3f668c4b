"""`policylab ...`: train, recipes, environments, components, show, samples, eval, arena, verify."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from policylab import registry
from policylab.config import RecipeError, available_recipes, load_raw, parse_override


def _train(args) -> int:
    import signal

    from policylab.train import interrupt
    from policylab.train.loop import TrainingError, train

    words = list(args.words)
    recipe = "quickstart"  # GRPO sized so the default model visibly learns on a CPU (recipes/quickstart.yaml)
    if words and "=" not in words[0]:
        recipe = words.pop(0)
    try:
        overrides = dict(parse_override(o) for o in words)
    except RecipeError as err:
        print(f"policylab train: error: {err}", file=sys.stderr)
        return 2
    for flag, key in (("model", "model.name"), ("task", "task.name"), ("steps", "train.steps"), ("seed", "train.seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.reward:  # your functions replace the recipe's rewards; rewards.N.weight=... overrides still apply after
        overrides = {"rewards": list(args.reward), **overrides}
    if args.env:
        try:
            overrides = {**env_overrides(recipe, args.env, bool(args.reward)), **overrides}
        except (RecipeError, registry.RegistryError) as err:
            print(f"policylab train: error: {err}", file=sys.stderr)
            return 2
    try:
        run_dir = train(recipe, run_dir=args.run_dir or args.resume, resume=bool(args.resume), **overrides)
    except (RecipeError, registry.RegistryError, TrainingError, ValueError, FileNotFoundError) as err:
        print(f"policylab train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a second Ctrl-C, or one before training started: no traceback
        if not getattr(err, "policylab_reported", False):  # the trainer has not printed where the run stands
            print("policylab train: interrupted", file=sys.stderr)
        return interrupt.exit_code(signal.SIGINT)
    stopped = interrupt.read_marker(run_dir)
    if stopped:  # a graceful stop: the trainer printed the line with the resume command
        return int(stopped["exit_code"])
    print(f"run directory: {run_dir}")
    return 0


def env_overrides(recipe: str, env: str, own_rewards: bool) -> dict:
    """``--env NAME``: the environment's task rows (its own parameters, none of the recipe's task's), and for a
    single-turn recipe the agent engine and the trajectory return as the reward (unless --reward is given)."""
    if ":" not in env:
        registry.get("environment", env)  # a misspelled name fails here, with the nearest names
    out = {"task.name": "environment", "task.environment": env, "task.params": {}}
    engine = load_raw(recipe).get("rollout", {}).get("engine", "hf_pruned")
    if (engine.get("name") if isinstance(engine, dict) else engine) != "agent":
        out["rollout.engine"] = {"name": "agent"}
        if not own_rewards:
            out["rewards"] = [{"name": "env_return"}]
    return out


def _environments(args) -> int:
    rows = []
    for name, entry in registry.entries("environment").items():
        params = ", ".join(f"{k}={p.default!r}" for k, p in registry.parameters(entry).items()
                           if p.default is not p.empty)
        rows.append({"name": name, "what it is": entry.summary, "reward": getattr(entry.target, "reward_mode", "?"),
                     "parameters": params, "spec": entry.spec})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("environment", "what it is", "reward", "parameters (task.params / rollout.engine.env_params)")
    for r in rows:
        table.add_row(r["name"], r["what it is"], r["reward"], r["parameters"])
    Console().print(table)
    return 0


def _recipes(args) -> int:
    rows = []
    for name, path in available_recipes().items():
        raw = load_raw(str(path))
        rows.append({"name": name, "description": raw.get("description", ""), "paper": raw.get("paper", "")})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("recipe", "what it does", "paper")
    for r in rows:
        table.add_row(r["name"], r["description"], r["paper"])
    Console().print(table)
    return 0


def _declarations(target) -> dict[str, str]:
    """requires/provides of a registered target as text; a parameter-dependent one says so."""
    from policylab import fields as F

    out = {}
    for what in ("requires", "provides"):
        value = getattr(target, what, ())
        if callable(value):
            out[what] = "(depends on parameters)"
        else:
            names = [v.name if isinstance(v, F.FieldSpec) else str(v) for v in (value or ())]
            out[what] = ", ".join(names)
    return out


def _components(args) -> int:
    registry.load_all()
    data = {}
    for kind in registry.KINDS:
        items = []
        for _, e in sorted(registry.entries(kind).items()):
            item = {"name": e.name, "summary": e.summary, "paper": e.spec}
            if args.verbose:
                item.update(module=e.target.__module__, **_declarations(e.target))
            items.append(item)
        data[kind] = items
    if args.kind:
        if args.kind not in data:
            print(f"policylab components: unknown kind {args.kind!r}{registry.suggest(args.kind, data)}", file=sys.stderr)
            return 2
        data = {args.kind: data[args.kind]}
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    columns = ["kind", "name", "paper", "summary"] + (["module", "requires", "provides"] if args.verbose else [])
    table = Table(*columns)
    for kind, items in data.items():
        for item in items:
            table.add_row(kind, *[str(item.get(c, "")) for c in columns[1:]])
    Console(width=None if not args.verbose else 240).print(table)
    return 0


def _show(args) -> int:
    from policylab.train import run_report

    try:
        text = run_report.report(args.run_dir)
    except run_report.NotARunError as err:
        print(f"policylab show: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _samples(args) -> int:
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.text import Text

    from policylab.train import run_report

    try:
        run_report.read_run(args.run_dir)  # the same "is this a run folder" check as `show`
        by_step = run_report.read_samples(args.run_dir)
    except run_report.NotARunError as err:
        print(f"policylab samples: error: {err}", file=sys.stderr)
        return 2
    if not by_step:
        print(f"policylab samples: error: {args.run_dir}/samples.jsonl holds no samples yet", file=sys.stderr)
        return 2
    step = max(by_step) if args.step is None else args.step
    if step not in by_step:
        steps = sorted(by_step)
        gaps = "" if len(steps) == steps[-1] - steps[0] + 1 else f" ({len(steps)} steps, not contiguous)"
        print(f"policylab samples: error: step {step} has no samples in {args.run_dir}/samples.jsonl; "
              f"logged steps: {steps[0]}..{steps[-1]}{gaps}", file=sys.stderr)
        return 2
    console = Console(highlight=False)
    rows = by_step[step]
    console.print(f"step {step}: {len(rows)} samples ({args.run_dir}/samples.jsonl)")
    for n, row in enumerate(rows, 1):
        reward = row.get("reward")
        title = f"sample {n}  reward {reward:.3f}" if isinstance(reward, (int, float)) else f"sample {n}  reward -"
        # Text, not markup: completions may contain [brackets] that rich would otherwise interpret
        body = Group(Text("prompt", style="bold"), Text(str(row.get("prompt", ""))),
                     Text("completion", style="bold"), Text(str(row.get("completion", ""))),
                     Text.assemble(("answer ", "bold"), str(row.get("answer"))))
        console.print(Panel(body, title=title, title_align="left"))
    return 0


def _delegate(module: str, function: str):
    """Subcommands implemented by a family module take the raw argv after the subcommand."""

    def run(argv: list[str]) -> int:
        try:
            target = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as err:
            print(f"policylab: this command is not available ({err})", file=sys.stderr)
            return 2
        return int(target(argv) or 0)

    return run


DELEGATED = {
    "eval": _delegate("policylab.eval.evaluate", "main_eval"),
    "arena": _delegate("policylab.eval.arena", "main_arena"),
    "verify": _delegate("policylab.rewards.math_answer.cli", "main_verify"),
}


def train_parser() -> argparse.ArgumentParser:
    t = argparse.ArgumentParser(prog="policylab train", description="train with a recipe (default: quickstart, GRPO on "
                                "SmolLM2-135M-Instruct, small sums, CPU)")
    t.add_argument("words", nargs="*", metavar="[RECIPE] [key=value ...]",
                   help="recipe name (see `policylab recipes`) or YAML path, then dotted overrides, "
                        "e.g. algorithm.objective.eps_high=0.28")
    t.add_argument("--model", help="smollm2 (default) | tiny | hub id | model folder | file.gguf")
    t.add_argument("--task", help="arithmetic (default) | a registered task | file.jsonl | file.parquet | a datasets "
                                  "folder (save_to_disk or data files) | a hub id owner/name")
    t.add_argument("--reward", action="append", metavar="FILE.py:FN", help="your reward function, file.py:fn or "
                   "package.module:fn (TRL's fn(prompts, completions, **kwargs) or fn(prompt, completion, row)); "
                   "repeatable; replaces the recipe's rewards")
    t.add_argument("--env", metavar="NAME", help="train on a multi-turn environment (see `policylab environments`, or "
                   "file.py:Class): its task rows, the agent engine, its return as the reward")
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--run-dir", help="where the run lives (default runs/<recipe>-<model>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.set_defaults(func=_train)
    return t


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policylab", description="RL post-training where every method is a recipe")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("train", help="train with a recipe (default: quickstart, GRPO on SmolLM2-135M-Instruct, small sums, CPU)", add_help=False)
    r = sub.add_parser("recipes", help="list recipes")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_recipes)
    e = sub.add_parser("environments", help="list multi-turn environments (for --env NAME)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_environments)
    c = sub.add_parser("components", help="list registered components by kind")
    c.add_argument("kind", nargs="?")
    c.add_argument("--json", action="store_true")
    c.add_argument("--verbose", "-v", action="store_true", help="also the module and the fields each requires/provides")
    c.set_defaults(func=_components)
    s = sub.add_parser("show", help="summary of a run (also one still going) and a refreshed curves.png")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.set_defaults(func=_show)
    p = sub.add_parser("samples", help="print the logged completions of one step of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--step", type=int, help="the step to print (default: the last logged step)")
    p.set_defaults(func=_samples)
    for name, help_text in (("eval", "evaluate a model or checkpoint on a task (pass@k, maj@k, calibration, ...)"),
                            ("arena", "run several recipes side by side and write a report"),
                            ("verify", "check a predicted math answer against a gold answer")):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argv[1:])
    if not argv or argv[0] == "train":
        train_args = train_parser().parse_intermixed_args(argv[1:])
        return train_args.func(train_args)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
