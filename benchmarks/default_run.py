#!/usr/bin/env python3
"""Does `policylab train` with no arguments visibly learn? Runs the default recipe on the default model
(SmolLM2-135M-Instruct, CPU) for each seed and prints held-out greedy accuracy at the first and last eval,
the difference, and the wall time of each run (the machine's load is yours to state).

    .venv/bin/python benchmarks/default_run.py                 # seeds 0 1 2, the defaults
    .venv/bin/python benchmarks/default_run.py --seeds 0 --set optimizer.lr=2e-5 --set train.steps=30

Every override (--set KEY=VALUE) goes to policylab.train as it would on the command line, so an experiment
here is reproducible with `policylab train KEY=VALUE ...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import policylab
from policylab.config import parse_override


def evals(run_dir: Path) -> list[dict]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [l for l in lines if "eval/accuracy" in l]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="quickstart", help="default: quickstart, what `policylab train` runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    args = ap.parse_args()
    overrides = dict(parse_override(o) for o in args.set)
    # an eval at step 0 is what "start" means; the recipe's own eval_every decides the rest
    overrides.setdefault("train.progress", False)
    root = args.out or Path(tempfile.mkdtemp(prefix="policylab-default-run-"))
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        run = policylab.train(args.recipe, run_dir=root / f"seed{seed}", **{**overrides, "train.seed": seed})
        wall = time.perf_counter() - t0
        points = evals(run)
        if len(points) < 2:
            print(f"seed {seed}: fewer than two evals logged (set train.eval_every > 0)", file=sys.stderr)
            return 2
        start, end = points[0], points[-1]
        rows.append((seed, start["eval/accuracy"], end["eval/accuracy"], wall, start["step"], end["step"]))
        print(f"seed {seed}: greedy held-out accuracy {start['eval/accuracy']:.3f} (step {start['step']}) -> "
              f"{end['eval/accuracy']:.3f} (step {end['step']}), {wall / 60:.1f} min, run {run}", flush=True)
    gains = [r[2] - r[1] for r in rows]
    print(f"== {args.recipe} {' '.join(args.set)}: gain in greedy accuracy per seed "
          f"{', '.join(f'{g:+.3f}' for g in gains)}; mean {statistics.mean(gains):+.3f}; "
          f"wall {statistics.mean(r[3] for r in rows) / 60:.1f} min per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
