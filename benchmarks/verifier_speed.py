"""Speed of the math answer verifier on 1,000 simple numeric answers, against Math-Verify on the same pairs.

The brief (issue 4, data_agents_eval.md §C1) asks that 1,000 simple answers take < 2 s with our verifier:
plain-number pairs are settled by the in-process fast path, never reaching a worker process.  Math-Verify
(``math_verify.parse`` + ``math_verify.verify``, called the way verl calls it: gold wrapped in
``\\boxed{}``) is timed on the same pairs for reference.

Run: ``python benchmarks/verifier_speed.py [--n 1000] [--seed 0] [--symbolic 200]``.  Prints one line per
verifier and the ratio, and where the two disagree.  ``--symbolic`` adds answers that need SymPy, which
our verifier sends to its worker pool (for information; the < 2 s target is for plain numbers).
"""

from __future__ import annotations

import argparse
import random
import time
from fractions import Fraction


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Gold answers and model outputs with a boxed (or 'The answer is') final number; ~half correct."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            gold = str(rng.randint(-1000, 100000))
            pred_value = gold if rng.random() < 0.5 else str(int(gold) + rng.randint(1, 9))
        elif kind == 1:
            value = Fraction(rng.randint(1, 9999), 100)
            gold = f"{float(value):.2f}"
            pred_value = gold if rng.random() < 0.5 else f"{float(value) + 0.01:.2f}"
        elif kind == 2:
            numerator, denominator = rng.randint(1, 50), rng.randint(2, 50)
            gold = f"{numerator}/{denominator}"
            pred_value = gold if rng.random() < 0.5 else f"{numerator + 1}/{denominator}"
        else:
            gold = str(rng.randint(1000, 9_999_999))
            pred_value = f"{int(gold):,}" if rng.random() < 0.5 else str(int(gold) - 1)
        if rng.random() < 0.8:
            pred = f"Let me compute step by step. ... so the result follows.\nThe final result is $\\boxed{{{pred_value}}}$."
        else:
            pred = f"After simplifying we get the value. The answer is {pred_value}."
        pairs.append((gold, pred))
    return pairs


def make_symbolic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Answers that need SymPy (radicals, pi, fractions of expressions): these go to the worker pool."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 9)
        form = rng.randrange(3)
        if form == 0:
            gold, good, bad = f"\\frac{{{a}\\sqrt{{{b}}}}}{{2}}", f"\\frac{{{a}}}{{2}}\\sqrt{{{b}}}", f"\\frac{{{a + 1}}}{{2}}\\sqrt{{{b}}}"
        elif form == 1:
            gold, good, bad = f"{a}\\pi", f"\\pi \\cdot {a}", f"{a}\\pi + 1"
        else:
            gold, good, bad = f"x^2 + {a}x", f"x(x+{a})", f"x(x+{a + 1})"
        pairs.append((gold, f"So the answer is $\\boxed{{{good if rng.random() < 0.5 else bad}}}$."))
    return pairs


def time_ours(pairs) -> tuple[float, list[bool]]:
    from policylab.rewards.math_answer import verify_batch

    golds, preds = zip(*pairs)
    start = time.perf_counter()
    results = verify_batch(list(golds), list(preds))
    return time.perf_counter() - start, [r.correct for r in results]


def time_math_verify(pairs) -> tuple[float, list[bool]]:
    from math_verify import parse, verify

    start = time.perf_counter()
    verdicts = []
    for gold, pred in pairs:
        gold_parsed = parse("\\boxed{" + gold + "}")
        pred_parsed = parse(pred)
        verdicts.append(bool(verify(gold_parsed, pred_parsed)))
    return time.perf_counter() - start, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--symbolic", type=int, default=200, help="also time this many SymPy-needing answers (0: skip)")
    args = parser.parse_args()
    pairs = make_pairs(args.n, args.seed)

    ours_s, ours = time_ours(pairs)
    theirs_s, theirs = time_math_verify(pairs)
    disagreements = [pairs[i] for i in range(len(pairs)) if ours[i] != theirs[i]]

    print(f"policylab math_answer.verify_batch: {args.n} answers in {ours_s:.3f} s ({1e3 * ours_s / args.n:.3f} ms/answer), {sum(ours)} correct")
    print(f"math_verify parse+verify:           {args.n} answers in {theirs_s:.3f} s ({1e3 * theirs_s / args.n:.3f} ms/answer), {sum(theirs)} correct")
    print(f"ratio math_verify / ours: {theirs_s / ours_s:.1f}x; disagreements: {len(disagreements)}")
    for gold, pred in disagreements[:5]:
        print(f"  disagree: gold={gold!r} pred={pred!r}")
    print(f"target < 2 s for ours: {'met' if ours_s < 2.0 else 'NOT met'}")

    if args.symbolic:
        from policylab.rewards.math_answer import default_pool

        default_pool().start()  # worker start-up is a one-off cost, not per answer
        symbolic = make_symbolic_pairs(args.symbolic, args.seed)
        ours_s, ours = time_ours(symbolic)
        theirs_s, theirs = time_math_verify(symbolic)
        agree = sum(a == b for a, b in zip(ours, theirs))
        print(f"symbolic answers (worker pool, {default_pool().size} workers): ours {ours_s:.3f} s, math_verify {theirs_s:.3f} s "
              f"for {args.symbolic}; ratio {theirs_s / ours_s:.2f}x; agree on {agree}/{args.symbolic}")


if __name__ == "__main__":
    main()
