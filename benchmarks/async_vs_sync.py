#!/usr/bin/env python3
"""Step time of async one-step-off-policy training (train.async, max_staleness=1) against the synchronous loop,
measured in one process, runs interleaved (sync, async, sync, async, ...) so both see the same machine load.

    PYTHONPATH=src .venv/bin/python benchmarks/async_vs_sync.py                      # tiny-arith, 3 repeats
    PYTHONPATH=src .venv/bin/python benchmarks/async_vs_sync.py --model smollm2 --steps 4 --repeats 1
    PYTHONPATH=src .venv/bin/python benchmarks/async_vs_sync.py --learning          # the learning check

The step time is the median of ``time/step_s`` over the steps after the first (the first async step has nothing
to overlap). Overlap pays only where generation and the update can run at once: on a 2-core CPU both compete
for the same cores, so expect a ratio near 1 there; ``uptime`` is printed before and after, state it with the
numbers. ``--learning`` runs tests/test_learning.py's task and settings (160 steps) sync and async K=1 and
prints the sampled held-out accuracy curves, the check that async K=1 learns to the same band.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import policylab
from policylab.config import parse_override

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import TINY_RUN  # noqa: E402
from tests.test_learning import LEARNING_RUN  # noqa: E402

ASYNC = {"train.async": True, "train.max_staleness": 1, "algorithm.rollout_correction": [{"name": "tis", "cap": 2.0}]}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def speed(args, overrides: dict) -> int:
    base = dict(TINY_RUN) if args.model == "tiny-arith" else {**TINY_RUN, "model.name": args.model,
                                                              "task.name": "arithmetic", "rollout.max_new_tokens": 32}
    base.update({"train.steps": args.steps, "train.eval_size": 0, **overrides})
    root = Path(tempfile.mkdtemp(prefix="policylab-async-bench-"))
    times: dict[str, list[float]] = {"sync": [], "async": []}
    gen: dict[str, list[float]] = {"sync": [], "async": []}
    print(f"load average before: {load()}  (cpu count {os.cpu_count()})")
    for r in range(args.repeats):
        for mode, extra in (("sync", {}), ("async", ASYNC)):
            run = policylab.train("grpo", run_dir=root / f"{mode}{r}", **{**base, **extra})
            steps = [m for m in rows(run) if "loss" in m][1:]
            times[mode] += [m["time/step_s"] for m in steps]
            gen[mode] += [m["time/generate_s"] for m in steps]
    print(f"load average after:  {load()}")
    s, a = statistics.median(times["sync"]), statistics.median(times["async"])
    print(f"model {args.model}, {args.steps} steps x {args.repeats} repeats, median over steps 2..{args.steps}")
    print(f"  sync   step {s:.3f} s  (generate {statistics.median(gen['sync']):.3f} s)")
    print(f"  async  step {a:.3f} s  (generate, overlapped, {statistics.median(gen['async']):.3f} s)")
    print(f"  async K=1 / sync step-time ratio: {a / s:.3f}")
    return 0


def learning(overrides: dict) -> int:
    root = Path(tempfile.mkdtemp(prefix="policylab-async-learning-"))
    print(f"load average before: {load()}")
    for mode, extra in (("sync", {}), ("async K=1", ASYNC)):
        t0 = time.perf_counter()
        run = policylab.train("grpo", run_dir=root / mode.replace(" ", "_").replace("=", ""),
                              **{**LEARNING_RUN, **extra, **overrides})
        curve = {m["step"]: round(m["eval/accuracy_sampled"], 3) for m in rows(run) if "eval/accuracy_sampled" in m}
        end = (curve[140] + curve[160]) / 2
        print(f"{mode}: sampled held-out accuracy {curve}; end (mean of 140, 160) - start = {end - curve[0]:+.3f} "
              f"(the learning test asks >= +0.15); {time.perf_counter() - t0:.0f} s")
    print(f"load average after:  {load()}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-arith")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--learning", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = {"train.progress": False, **dict(parse_override(o) for o in args.set)}
    return learning(overrides) if args.learning else speed(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
