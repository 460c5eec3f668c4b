"""Held-out evaluation of a model: k sampled completions per prompt plus one greedy completion, scored
by the training verifier, summarised with every Part E metric (data_agents_eval.md E1-E7).

``evaluate`` is a plain function so the training loop, the arena and ``policylab eval`` share it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from policylab.eval import metrics as M
from policylab.eval.stats import bootstrap_ci
from policylab.rollouts import Rollouts

RewardFn = Callable[[str, str, dict], "float | None"]
AnswerFn = Callable[[str, dict], "str | None"]


def default_answer(completion: str, row: dict) -> str | None:
    """The answer a completion votes for in maj@k: the last number in it (arithmetic-style tasks).
    Pass ``answer_fn`` for other answer formats (e.g. the math verifier's extractor)."""
    from policylab.rewards.basic import last_number

    return last_number(completion)


def verdicts(reward_fn: RewardFn, rollouts: Rollouts, threshold: float) -> tuple[list[float], list[bool]]:
    """(reward, correct) per completion; a reward that raises or returns None/NaN counts as incorrect.
    Correct means reward > threshold: the training loop's ``accuracy`` rule (rewards/combine.py)."""
    rewards, correct = [], []
    for prompt, completion, row in zip(rollouts.prompts, rollouts.completions, rollouts.rows):
        try:
            value = reward_fn(prompt, completion, row)
            value = math.nan if value is None else float(value)
        except Exception:  # a failing verifier costs that sample, as in training
            value = math.nan
        rewards.append(value)
        correct.append(math.isfinite(value) and value > threshold)
    return rewards, correct


@torch.no_grad()
def score_completions(
    model, rollouts: Rollouts, *, temperature: float = 1.0, batch_size: int = 16, with_hidden: bool = True
) -> dict[str, torch.Tensor]:
    """Teacher-forced pass over prompt+completion: ``logp`` [B,T] at temperature 1 (E3 confidence),
    ``entropy`` [B,T] at the sampling temperature (E4), ``hidden`` [B,T,H] last-layer states of the
    response tokens themselves (E5). Everything returned on CPU."""
    from policylab.models.vocab import token_logp_entropy

    device = next(model.parameters()).device
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    was_training = model.training
    model.eval()
    logps, entropies, hiddens = [], [], []
    try:
        for start in range(0, rollouts.batch_size, batch_size):
            part = slice(start, start + batch_size)
            prompt_ids, completion_ids = rollouts.prompt_ids[part], rollouts.completion_ids[part]
            prompt_len, width = prompt_ids.shape[1], completion_ids.shape[1]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1).to(device)
            attention = torch.cat([rollouts.prompt_mask[part].long(), rollouts.completion_mask[part].long()], dim=1)
            attention = attention.to(device)
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            hidden = base(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False)
            hidden = hidden.last_hidden_state
            # the state at position p predicts token p+1, so completion token t is predicted at prompt_len-1+t
            predicting = hidden[:, prompt_len - 1 : prompt_len - 1 + width]
            targets = completion_ids.to(device)
            logp, entropy = token_logp_entropy(predicting, head, targets, temperature=1.0)
            if temperature not in (0.0, 1.0):
                _, entropy = token_logp_entropy(predicting, head, targets, temperature=temperature)
            logps.append(logp.float().cpu())
            entropies.append(entropy.float().cpu())
            if with_hidden:
                hiddens.append(hidden[:, prompt_len : prompt_len + width].float().cpu())
    finally:
        model.train(was_training)
    out = {"logp": torch.cat(logps), "entropy": torch.cat(entropies)}
    if with_hidden:
        out["hidden"] = torch.cat(hiddens)
    return out


def recipe_engine(recipe, model, tokenizer):
    """The recipe's rollout engine (``rollout.engine`` with its parameters), bound to ``model``."""
    from policylab import registry

    spec = recipe.rollout.engine
    engine = registry.build("rollout_engine", spec.name, spec.params, where="rollout.engine")
    engine.bind(model, tokenizer)
    return engine


def _sample(engine, rows, *, group_size, temperature, top_p, top_k, max_new_tokens, batch_size, seed):
    from policylab.interfaces import Sampling

    settings = Sampling(group_size=group_size, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # evaluation must not shift the training run's RNG stream
        torch.manual_seed(seed)
        return engine.generate(rows, settings)


def evaluate(
    model,
    tokenizer,
    rows: Sequence[dict],
    reward_fn: RewardFn,
    k: int = 8,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 64,
    greedy: bool = True,
    ks: Sequence[int] | None = None,
    answer_fn: AnswerFn = default_answer,
    equivalent: Callable[[str, str], bool] = M.numeric_or_text_equal,
    correct_threshold: float = 0.5,
    generation_batch_size: int = 0,
    score_batch_size: int = 16,
    er_stride: int = 64,
    bootstrap_resamples: int = 1000,
    seed: int = 0,
    keep_samples: int = 0,
    engine: Any = None,
) -> dict[str, Any]:
    """Sample ``k`` completions per held-out prompt (and one greedy completion) and compute Part E metrics.

    Returns a flat JSON-ready dict: the sampling settings (E1 reporting rule), ``pass@j`` and ``maj@j``
    for j in ``ks`` (default 1, 2, 4, ..., k) with bootstrap CIs of pass@j over problems, ``accuracy``
    (= mean sample correctness = pass@1), ``greedy_accuracy``, ``auc`` / ``auc_per_question`` and a
    thinned ``precision_coverage`` curve (E3), ``entropy/*`` (E4), ``er*`` (E5), ``length/*`` (E6), and
    ``tool/*`` (E7) when the engine recorded ``extras['num_tool_calls']``.

    ``engine``: a built rollout engine bound to ``model`` (e.g. the recipe's, :func:`recipe_engine`);
    default a fresh ``hf`` engine bound to ``model``.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("evaluate needs at least one held-out row")
    if k < 1:
        raise ValueError(f"evaluate needs k >= 1 samples per prompt, got {k}")
    if temperature <= 0:
        raise ValueError("evaluate samples k completions: temperature must be > 0 (greedy=True adds the greedy one)")
    ks = sorted({int(j) for j in (ks or M.default_ks(k))})
    if ks[0] < 1 or ks[-1] > k:
        raise ValueError(f"evaluate ks must lie in [1, k={k}], got {ks}")

    if engine is None:
        from policylab.rollout.hf import HFEngine

        engine = HFEngine()
        engine.bind(model, tokenizer)
    rollouts = _sample(engine, rows, group_size=k, temperature=temperature, top_p=top_p, top_k=top_k,
                       max_new_tokens=max_new_tokens, batch_size=generation_batch_size, seed=seed)
    rewards, correct = verdicts(reward_fn, rollouts, correct_threshold)
    groups = rollouts.group.tolist()
    per_prompt_correct = [0] * len(rows)
    for g, ok in zip(groups, correct):
        per_prompt_correct[g] += int(ok)

    out: dict[str, Any] = {
        "num_prompts": len(rows), "k": k, "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "max_new_tokens": max_new_tokens, "num_samples": len(correct),
        "accuracy": sum(correct) / len(correct),
        "reward/mean": _nanmean(rewards),
        "reward/failed": sum(not math.isfinite(r) for r in rewards) / len(rewards),
    }
    for j in ks:
        per_problem = [M.pass_at_k(k, c, j) for c in per_prompt_correct]
        out[f"pass@{j}"] = sum(per_problem) / len(per_problem)
        if bootstrap_resamples > 0:
            out[f"pass@{j}_ci"] = list(bootstrap_ci(per_problem, resamples=bootstrap_resamples, seed=seed))
    out.update(_majority(rollouts, correct, groups, len(rows), ks, answer_fn, equivalent, seed))

    scores = score_completions(model, rollouts, temperature=temperature, batch_size=score_batch_size,
                               with_hidden=er_stride > 0)
    mask = rollouts.completion_mask
    confidence = M.sequence_confidence(scores["logp"], mask)
    out["auc"] = M.confidence_auc(confidence, correct)
    out["auc_per_question"] = M.per_question_auc(confidence, correct, groups)
    out["confidence/mean"] = float(confidence.mean())
    out["precision_coverage"] = _thin(M.precision_coverage(confidence, correct), 25)
    out.update({f"entropy/{key}": v for key, v in M.entropy_stats(scores["entropy"], mask).items()})
    if er_stride > 0:
        out.update(M.hidden_rank_stats(scores["hidden"], mask, correct, stride=er_stride))
    out.update({f"length/{key}": v for key, v in M.length_stats(mask, rollouts.truncated, correct).items()})
    calls = rollouts.extras.get("num_tool_calls")
    if calls is not None:
        calls = calls.tolist() if isinstance(calls, torch.Tensor) else list(calls)
        out.update({f"tool/{key}": v for key, v in M.tool_use_stats(calls, correct).items()})

    if greedy:
        greedy_rollouts = _sample(engine, rows, group_size=1, temperature=0.0, top_p=1.0, top_k=0,
                                  max_new_tokens=max_new_tokens, batch_size=generation_batch_size, seed=seed)
        _, greedy_correct = verdicts(reward_fn, greedy_rollouts, correct_threshold)
        out["greedy_accuracy"] = sum(greedy_correct) / len(greedy_correct)
    if keep_samples:
        out["samples"] = [
            {"prompt": rows[g]["prompt"], "answer": rows[g].get("answer"), "completion": text, "reward": r}
            for g, text, r in list(zip(groups, rollouts.completions, rewards))[:keep_samples]
        ]
    return out


def _majority(rollouts, correct, groups, num_prompts, ks, answer_fn, equivalent, seed) -> dict[str, float]:
    by_prompt: list[list[int]] = [[] for _ in range(num_prompts)]
    for i, g in enumerate(groups):
        by_prompt[g].append(i)
    totals = {j: 0.0 for j in ks}
    for members in by_prompt:
        answers = [answer_fn(rollouts.completions[i], rollouts.rows[i]) for i in members]
        clusters = M.cluster_answers(answers, equivalent)
        flags = [correct[i] for i in members]
        for j in ks:
            totals[j] += M.maj_at_k(clusters, flags, j, seed=seed)
    return {f"maj@{j}": totals[j] / num_prompts for j in ks}


def _nanmean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _thin(curve: list, points: int) -> list:
    if len(curve) <= points:
        return [list(p) for p in curve]
    step = (len(curve) - 1) / (points - 1)
    return [list(curve[round(i * step)]) for i in range(points)]


# ----------------------------------------------------------------------------------------------
# command line


def primary_reward(recipe) -> RewardFn:
    """The reward that defines correctness: the recipe's first reward, as the loop's ``accuracy`` does."""
    from policylab import registry

    spec = recipe.rewards[0]
    params = {k: v for k, v in spec.params.items() if k != "weight"}
    return registry.build("reward", spec.name, params, where="rewards.0")


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="policylab eval", description="sample k completions per held-out prompt and "
                                "report pass@k, maj@k, greedy accuracy, calibration AUC, entropy, effective rank, lengths")
    p.add_argument("target", nargs="?", help="a run directory (its latest checkpoint, task and rewards are used) or a "
                   "model (tiny | smollm2 | hub id | folder | .gguf); default: --model")
    p.add_argument("--model", help="model to evaluate when TARGET is not a run directory")
    p.add_argument("--recipe", default="grpo", help="recipe whose task and first reward define the evaluation "
                   "when TARGET is not a run directory (default grpo)")
    p.add_argument("--task", help="task name or data file (overrides the recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    p.add_argument("-k", "--k", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("-n", "--num-prompts", type=int, default=32, help="held-out prompts (default 32)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, help="default: the recipe's rollout.max_new_tokens")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--er-stride", type=int, default=64, help="effective-rank prefix stride (0: skip E5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--samples", type=int, default=0, help="keep this many completions in the output")
    p.add_argument("--out", help="write the result JSON here (default: stdout only)")
    return p


def main_eval(argv: list[str]) -> int:
    from policylab.models import quiet_transformers

    quiet_transformers()
    from policylab import models
    from policylab.config import RecipeError, load_recipe, parse_override
    from policylab.registry import RegistryError, build, names
    from policylab.tasks.hf_datasets import task_for_name
    from policylab.train import checkpoint

    args = eval_parser().parse_args(argv)
    try:
        overrides = dict(parse_override(o) for o in args.set)
        if args.task:
            overrides["task.name"] = args.task
        if "task.name" in overrides:  # a data file, datasets folder or hub id stands for its task
            spec = task_for_name(str(overrides["task.name"]), names("task"))
            if spec is not None:
                overrides.pop("task.name")
                overrides["task"] = spec
        target = Path(args.target) if args.target else None
        if target is not None and (target / "config.yaml").exists():
            recipe = load_recipe(str(target / "config.yaml"), overrides)
            latest = checkpoint.latest(target)
            if latest is None:
                raise ValueError(f"run directory {target} has no checkpoint to evaluate")
            model_name = str(latest)
        else:
            model_name = args.target or args.model
            if not model_name:
                raise ValueError("name a run directory or a model (TARGET or --model)")
            recipe = load_recipe(args.recipe, overrides)
        reward_fn = primary_reward(recipe)  # a recorded user reward that cannot be imported fails before the model loads
        task = build("task", recipe.task.name, recipe.task.params, where="task")()
        rows = task.eval[: args.num_prompts]
        if not rows:
            raise ValueError(f"task {task.name!r} has no held-out split to evaluate on")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model, tokenizer = models.load(model_name, recipe.model.dtype, device, tiny=recipe.model.tiny, seed=args.seed)
        engine = recipe_engine(recipe, model, tokenizer)
        try:
            result = evaluate(model, tokenizer, rows, reward_fn, k=args.k, temperature=args.temperature,
                              top_p=args.top_p, max_new_tokens=args.max_new_tokens or recipe.rollout.max_new_tokens,
                              greedy=not args.no_greedy, er_stride=args.er_stride, seed=args.seed,
                              keep_samples=args.samples, engine=engine)
        finally:
            engine.close()
    except (RecipeError, RegistryError, ValueError, OSError) as err:
        print(f"policylab eval: error: {err}", file=sys.stderr)
        return 2
    result = {"model": model_name, "task": task.name, **result}
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    shown = {k: v for k, v in result.items() if k not in ("precision_coverage", "samples") and not k.endswith("_ci")}
    print(json.dumps(shown, indent=1, default=str))
    return 0

