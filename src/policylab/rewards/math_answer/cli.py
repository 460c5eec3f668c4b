"""``policylab verify GOLD PRED [--json]``: check one answer from the shell (data_agents_eval.md §C1)."""

from __future__ import annotations

import argparse
import json

from policylab.rewards.math_answer.core import VerifierOptions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policylab verify",
        description="Check whether a model output PRED states the same final answer as GOLD (rules of data_agents_eval.md C1.3). "
                    "GOLD and PRED may start with '-' (e.g. '-\\frac{1}{2}'); '--' also ends the options.",
    )
    parser.add_argument("gold", metavar="GOLD", help=r"gold answer, e.g. '\frac{1}{2}'")
    parser.add_argument("pred", metavar="PRED", help=r"model output, e.g. 'so the answer is \boxed{0.5}'")
    parser.add_argument("--json", action="store_true", help="print one JSON object: score, correct, gold, pred, reason")
    parser.add_argument("--problem", default=None, help="problem text (rejects an inequality copied from it)")
    parser.add_argument("--timeout", type=float, default=10.0, help="whole-call time limit in seconds (default 10)")
    return parser


_FLAGS = ("--json", "-h", "--help")
_VALUED = ("--problem", "--timeout")


def _values_after_options(argv: list[str]) -> list[str]:
    """Reorder argv so GOLD/PRED may start with "-" (``-\\frac{1}{2}``, ``-x+1``): our options, then ``--``,
    then every other word. argparse alone reads such a value as an unknown option; a word that looks like a
    long option (``--jsn``) is still left to argparse, so a typo stays a usage error."""
    options: list[str] = []
    values: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            values.extend(words)
            break
        if word in _FLAGS or word.split("=", 1)[0] in _VALUED:
            options.append(word)
            if word in _VALUED:
                options.append(next(words, ""))
        elif word.startswith("--"):
            options.append(word)  # an unknown long option: argparse names it
        else:
            values.append(word)
    return options + ["--"] + values


def main_verify(argv: list[str]) -> int:
    """Run the command; exit status 0 = correct, 1 = incorrect (including timeout), 2 = usage error.

    ``policylab verify -- GOLD PRED`` and values starting with "-" both work (see :func:`_values_after_options`).
    """
    args = _parser().parse_args(_values_after_options(list(argv)))
    if args.timeout <= 0:
        _parser().error("--timeout must be positive")
    from policylab.rewards.math_answer.pool import verify

    stage = min(5.0, args.timeout)
    options = VerifierOptions(parse_timeout_s=stage, compare_timeout_s=stage, call_timeout_s=args.timeout)
    result = verify(args.gold, args.pred, problem=args.problem, options=options)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        verdict = "correct" if result.correct else "incorrect"
        print(f"{verdict} (reason: {result.reason}; gold: {result.gold!r}; extracted: {result.pred!r})")
    return 0 if result.correct else 1
