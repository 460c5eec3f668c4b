"""Loop-level behaviour: exact resume, left padding, bad input handling, CLI."""

import json
import subprocess
import sys

import pytest
import torch

import policylab
from policylab import models
from policylab.rollout.hf import HFEngine, SamplingSettings
from policylab.rollouts import Rollouts
from policylab.tasks.files import DatasetError, read_rows
from policylab.models.forward import policy_forward, trim
from policylab.train.loop import TrainingError
from tests.conftest import TINY_RUN

VOLATILE = ("time/", "tokens_per_s", "memory/")


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_arith_model):
    settings = {**TINY_RUN, "train.eval_every": 2, "train.mini_batches": 2, "algorithm.objective.eps_high": 0.28}
    full = policylab.train("grpo", run_dir=tmp_path / "full", **{**settings, "train.steps": 6})
    half = policylab.train("grpo", run_dir=tmp_path / "half", **{**settings, "train.steps": 3})
    resumed = policylab.train("grpo", run_dir=half, resume=True, **{"train.steps": 6})
    assert resumed == half
    # the interrupted run also evaluated at its end (step 3); every other line must be identical
    assert _metrics(full) == [r for r in _metrics(half) if not (r["step"] == 3 and "eval/accuracy" in r)]
    # the weights too, not only the logged numbers
    a = torch.load(full / "checkpoints" / "step-6" / "trainer_state.pt", weights_only=False)["rng"]["torch"]
    b = torch.load(half / "checkpoints" / "step-6" / "trainer_state.pt", weights_only=False)["rng"]["torch"]
    assert torch.equal(a, b)


def test_left_padding_gives_the_same_logprobs_as_no_padding():
    torch.manual_seed(0)
    model, tok = models.load("tiny")
    rows = [{"prompt": "1 + 2="}, {"prompt": "13 + 14 + 15="}]
    engine = HFEngine()
    engine.bind(model, tok)
    batch = engine.generate(rows, SamplingSettings(group_size=2, max_new_tokens=5))
    together = policy_forward(model, trim(batch)).logp
    for i in range(batch.batch_size):
        alone = policy_forward(model, trim(batch.select([i]))).logp[0]
        width = alone.shape[0]
        assert torch.allclose(alone, together[i, :width], atol=1e-5)
    # and the behaviour log-probs recorded while sampling match the training forward
    assert torch.allclose(batch.behavior_logp, together * batch.completion_mask, atol=1e-5)


def test_dataset_errors_name_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": 4\n')
    with pytest.raises(DatasetError, match=r"data.jsonl:2: invalid JSON"):
        read_rows(f)
    f.write_text('{"prompt": "1+1", "answer": "2"}\n{"answer": "4"}\n')
    with pytest.raises(DatasetError, match=r"data.jsonl:2: missing or empty 'prompt'"):
        read_rows(f)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="has no rows"):
        read_rows(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")


def test_jsonl_task_trains_and_extra_columns_reach_rewards(tmp_path, tiny_arith_model):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a} + {a}=", "answer": str(2 * a), "source": "unit"}) + "\n" for a in range(20)))
    from policylab.registry import register

    seen = []

    @register("reward", "_test_records_extra_column")
    def record(prompt, completion, row):
        seen.append(row["source"])
        return 1.0

    run = policylab.train("grpo", run_dir=tmp_path / "run", **{**TINY_RUN, "task.name": str(data), "train.steps": 1,
                                                              "rewards": [{"name": "_test_records_extra_column"}]})
    assert seen and set(seen) == {"unit"}
    assert (run / "metrics.jsonl").exists()


def test_raising_reward_counts_as_failed_and_all_failed_stops(tmp_path, tiny_arith_model):
    from policylab.registry import register

    calls = {"n": 0}

    @register("reward", "_test_sometimes_raises")
    def flaky(prompt, completion, row):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("judge unavailable")
        return 1.0

    @register("reward", "_test_always_raises")
    def broken(prompt, completion, row):
        raise RuntimeError("boom")

    run = policylab.train("grpo", run_dir=tmp_path / "flaky", **{**TINY_RUN, "train.steps": 1,
                                                                "rewards": [{"name": "_test_sometimes_raises"}]})
    first = _metrics(run)[0]
    assert first["reward/failed"] == 8  # half of the 16 completions
    with pytest.warns(UserWarning, match="boom"), pytest.raises(TrainingError, match="every reward in the batch failed"):
        policylab.train("grpo", run_dir=tmp_path / "broken", **{**TINY_RUN, "train.steps": 2,
                                                               "rewards": [{"name": "_test_always_raises"}]})


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, tiny_arith_model):
    from policylab.registry import register

    @register("objective", "_test_nan_objective", tags=("skip:T-ONPOL", "skip:T-ZEROADV", "skip:T-PAD", "skip:T-MICRO", "skip:contract"))
    def nan_objective(out, batch):
        """Always NaN (test helper for the non-finite guard)."""
        return out.logp * float("nan"), {}

    with pytest.raises(TrainingError, match="consecutive steps had a non-finite"):
        policylab.train("grpo", run_dir=tmp_path / "nan", **{**TINY_RUN, "train.steps": 5, "train.max_bad_steps": 2,
                                                            "algorithm.objective": {"name": "_test_nan_objective"}})
    lines = _metrics(tmp_path / "nan")
    assert [r.get("skipped_nonfinite") for r in lines] == [1.0, 1.0]


def test_cli_lists_recipes_and_components():
    out = subprocess.run([sys.executable, "-m", "policylab.cli", "recipes", "--json"], capture_output=True, text=True, check=True)
    names = {r["name"] for r in json.loads(out.stdout)}
    assert {"grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "lite_ppo", "dr_grpo"} <= names
    out = subprocess.run([sys.executable, "-m", "policylab.cli", "components", "--json"], capture_output=True, text=True, check=True)
    kinds = json.loads(out.stdout)
    assert {"grpo", "rloo"} <= {c["name"] for c in kinds["advantage"]}


def test_cli_unknown_key_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "policylab.cli", "train", "grpo", "--model", "tiny", "train.stepz=3"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown key 'train.stepz'" in out.stderr and "did you mean 'steps'" in out.stderr


def test_prefix_sharing_gives_the_same_logprobs_and_gradients(tiny_arith_model):
    torch.manual_seed(0)
    model, tok = models.load(tiny_arith_model)
    rows = [{"prompt": "1 + 2="}, {"prompt": "13 + 14 + 15="}]
    engine = HFEngine()
    engine.bind(model, tok)
    batch = trim(engine.generate(rows, SamplingSettings(group_size=3, max_new_tokens=6)))
    mask = batch.completion_mask

    def run(share):
        model.zero_grad()
        out = policy_forward(model, batch, share_prompts=share, packed=False)  # the KV-cache sharing path
        (out.logp * mask).sum().backward()
        return out.logp.detach() * mask, torch.cat([p.grad.flatten() for p in model.parameters()])

    logp_plain, grad_plain = run(False)
    logp_shared, grad_shared = run(True)
    assert torch.allclose(logp_plain, logp_shared, atol=1e-5)
    assert (grad_plain - grad_shared).norm() / grad_plain.norm() < 1e-4


def test_gradient_checkpointing_takes_effect_and_changes_no_number(tmp_path, tiny_arith_model):
    from policylab.config import load_recipe
    from policylab.train.loop import Trainer

    settings = {**TINY_RUN, "train.steps": 2, "train.eval_size": 0}
    plain = policylab.train("grpo", run_dir=tmp_path / "plain", **settings)
    checkpointed = policylab.train("grpo", run_dir=tmp_path / "gc", **{**settings, "model.gradient_checkpointing": True})
    a, b = _metrics(plain), _metrics(checkpointed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "reward/mean"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    # and it really checkpoints: the training forward keeps far fewer tensors for backward
    recipe = load_recipe("grpo", {**settings, "model.gradient_checkpointing": True})
    trainer = Trainer(recipe, tmp_path / "probe")
    assert trainer.model.training
    batch = trainer.parts.engine.generate(trainer.task.train[:2], trainer.sampling)

    def saved_bytes():
        total = [0]

        def keep(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            policy_forward(trainer.model, trim(batch), share_prompts=True)
        return total[0]

    with_gc = saved_bytes()
    (getattr(trainer.model, "activation_checkpointing_disable", None) or trainer.model.gradient_checkpointing_disable)()
    assert with_gc < 0.6 * saved_bytes()
