"""The learning claim of the foundation issue (§14): the warmed-up tiny model, trained with the grpo
recipe on the tiny arithmetic testbed, raises its *sampled* held-out accuracy by at least 15 points.

Seeded end to end (SFT warm-up, model init, sampling, eval); about 3-5 CPU minutes.
"""

import json

import pytest

import policylab

LEARNING_RUN = {
    "model.name": "tiny-arith",
    "task.name": "tiny_arithmetic",
    "rollout.group_size": 8,
    "rollout.max_new_tokens": 6,
    "train.prompts_per_step": 32,
    "train.micro_batch_size": 64,
    "train.steps": 100,
    "train.eval_every": 20,
    "train.eval_size": 100,
    "train.eval_samples": 8,
    "train.seed": 0,
    "train.progress": False,
    "optimizer.lr": 5.0e-4,
}


@pytest.mark.slow
def test_grpo_raises_sampled_heldout_accuracy_by_15_points(tmp_path, tiny_arith_model):
    run = policylab.train("grpo", run_dir=tmp_path / "grpo", **LEARNING_RUN)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in line]
    curve = {r["step"]: round(r["eval/accuracy_sampled"], 4) for r in evals}
    print("sampled held-out accuracy by step:", curve)
    assert set(curve) == {0, 20, 40, 60, 80, 100}
    assert curve[100] - curve[0] >= 0.15, curve
