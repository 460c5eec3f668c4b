"""Rollout correction (algo/rollout_correction.py) and the drift guard (train/drift_guard.py): identity on
identical log-probs, hand-computed caps and masks, composition with an objective, and a run that stops when the
engine's log-probs drift from the training forward."""

import json
import math

import pytest
import torch

import policylab
from policylab import registry
from policylab.algo import rollout_correction as rc
from policylab.algo.objectives.policy_gradient import ppo_clip_loss
from policylab.rollouts import PolicyOutputs, Rollouts
from policylab.rollout.hf import HFEngine
from policylab.train.drift_guard import DriftError, check_drift, due, mean_abs_drift
from policylab.train.loop import TrainingError
from tests.conftest import TINY_RUN

LN2 = math.log(2.0)


def _batch(train_logp, behav_logp, mask, adv=None):
    b, t = mask.shape
    batch = Rollouts(prompt_ids=torch.ones(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1),
                     completion_ids=torch.ones(b, t, dtype=torch.long), completion_mask=mask,
                     group=torch.zeros(b, dtype=torch.long), truncated=torch.zeros(b, dtype=torch.bool),
                     behavior_logp=behav_logp)
    batch.advantages = torch.ones(b) if adv is None else adv
    return batch, PolicyOutputs(logp=train_logp.clone().requires_grad_(True))


CORRECTIONS = [("tis", {"level": "token"}), ("tis", {"level": "sequence"}), ("mis", {"level": "token"}),
               ("mis", {"level": "sequence"}), ("mis", {"level": "geometric"}), ("icepop", {})]


@pytest.mark.parametrize("name,params", CORRECTIONS)
def test_identical_logprobs_make_every_correction_the_identity(name, params):
    torch.manual_seed(0)
    logp = -torch.rand(3, 5) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    batch, out = _batch(logp, logp.clone(), mask)
    factors, metrics = registry.build("rollout_correction", name, params)(out, batch)
    assert torch.equal(factors, mask)
    assert float(metrics["rollout_corr/masked_frac"]) == 0.0
    assert float(metrics["rollout_corr/kl_k3"]) == 0.0 and float(metrics["rollout_corr/abs_dlogp_max"]) == 0.0


def test_token_tis_caps_each_ratio_by_hand():
    # ratios pi_train/pi_behav = 4, 1/2, 1 on row 0: capped at 2 -> 2, 0.5, 1
    behav = torch.tensor([[-2 * LN2, 0.0, -1.0]])
    train = torch.tensor([[0.0, -LN2, -1.0]])
    batch, out = _batch(train, behav, torch.ones(1, 3))
    w, _ = rc.tis(out, batch, level="token", cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 1.0]]))


def test_sequence_tis_uses_the_product_of_token_ratios():
    # row 0: ratios 2 * 2 = 4 -> capped at 3; row 1: 2 * 1/4 = 1/2, uncapped; padding stays 0
    train = torch.tensor([[LN2, LN2, 0.0], [LN2, -2 * LN2, 5.0]])
    behav = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch, out = _batch(train, behav, mask)
    w, _ = rc.tis(out, batch, level="sequence", cap=3.0)
    assert torch.allclose(w, torch.tensor([[3.0, 3.0, 3.0], [0.5, 0.5, 0.0]]))


def test_token_mis_drops_tokens_outside_the_band_and_reports_the_fraction():
    # ratios 4, 1, 1/4, 1.5 with [0.5, 2]: tokens 0 and 2 dropped
    train = torch.tensor([[2 * LN2, 0.0, -2 * LN2, math.log(1.5)]])
    batch, out = _batch(train, torch.zeros(1, 4), torch.ones(1, 4))
    m, metrics = rc.mis(out, batch, level="token", low=0.5, high=2.0)
    assert torch.equal(m, torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    assert float(metrics["rollout_corr/masked_frac"]) == pytest.approx(0.5)
    assert float(metrics["rollout_corr/abs_dlogp_max"]) == pytest.approx(2 * LN2)


def test_sequence_and_geometric_masks_differ_on_long_rows():
    # 4 tokens with ratio 1.5 each: product 5.06 (outside [0.5, 2]), geometric mean 1.5 (inside)
    train = torch.full((1, 4), math.log(1.5))
    batch, out = _batch(train, torch.zeros(1, 4), torch.ones(1, 4))
    seq, _ = rc.mis(out, batch, level="sequence", low=0.5, high=2.0)
    geo, _ = rc.mis(out, batch, level="geometric", low=0.5, high=2.0)
    assert torch.equal(seq, torch.zeros(1, 4)) and torch.equal(geo, torch.ones(1, 4))


def test_mismatch_metrics_by_hand():
    # d = log pi_train - log pi_behav = (ln 2, -ln 2) on the two trained tokens
    train, behav = torch.tensor([[LN2, -LN2, 9.0]]), torch.zeros(1, 3)
    m = rc.mismatch_metrics(train, behav, torch.tensor([[1.0, 1.0, 0.0]]))
    assert float(m["rollout_corr/kl_k1"]) == pytest.approx(0.0, abs=1e-7)
    assert float(m["rollout_corr/kl_k3"]) == pytest.approx(((2 - 1 - LN2) + (0.5 - 1 + LN2)) / 2)
    assert float(m["rollout_corr/abs_dlogp_mean"]) == pytest.approx(LN2)


def test_frozen_old_logp_is_the_training_side_of_the_ratio():
    # with old_logp stored (mu > 1) the ratio is pi_old / pi_behav whatever the current forward says
    batch, out = _batch(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))
    batch.old_logp = torch.tensor([[LN2, 0.0]])
    w, _ = rc.tis(out, batch, level="token", cap=10.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0]]))


def test_correction_reweights_the_objective_gradient():
    # PPO-clip on-policy gives d loss / d logp = -A per token; a TIS factor of 2 doubles it, a mask zeroes it
    train = torch.tensor([[0.0, 0.0, 0.0]])
    behav = torch.tensor([[-LN2, 0.0, -5.0]])  # ratios 2, 1, e^5 -> token TIS cap 3: 2, 1, 3
    batch, out = _batch(train, behav, torch.ones(1, 3))
    loss, _ = ppo_clip_loss(out, batch)
    w, _ = rc.tis(out, batch, level="token", cap=3.0)
    (loss * w).sum().backward()
    assert torch.allclose(out.logp.grad, -torch.tensor([[2.0, 1.0, 3.0]]))


def test_bad_parameters_are_named():
    batch, out = _batch(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="low < 1 < high"):
        rc.mis(out, batch, low=1.5, high=2.0)
    with pytest.raises(ValueError, match="level"):
        rc.tis(out, batch, level="segment")
    batch.behavior_logp = None
    with pytest.raises(ValueError, match="behavior_logp"):
        rc.tis(out, batch)


def test_drift_guard_thresholds():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert mean_abs_drift(torch.tensor([[0.1, -0.3, 7.0]]), torch.zeros(1, 3), mask) == pytest.approx(0.2)
    assert [s for s in range(25) if due(s, 10)] == [0, 10, 20] and not due(0, 0)
    warned = []
    check_drift(0.01, warn=0.05, stop=0.5, step=1, warn_fn=warned.append)
    assert not warned
    check_drift(0.1, warn=0.05, stop=0.5, step=1, warn_fn=warned.append)
    assert len(warned) == 1 and "0.1000" in warned[0]
    with pytest.raises(DriftError, match="precision.*chat template.*sampling settings.*stale weights"):
        check_drift(0.6, warn=0.05, stop=0.5, step=1, warn_fn=warned.append)


class HotEngine(HFEngine):
    """Samples at twice the recipe's temperature but reports those log-probs as the behaviour policy's:
    the injected drift the guard must catch."""

    def generate(self, requests, sampling, *, group_offset=0):
        hot = type(sampling)(**{**sampling.__dict__, "temperature": sampling.temperature * 4})
        return super().generate(requests, hot, group_offset=group_offset)


@pytest.fixture
def hot_engine():
    registry.register("rollout_engine", "_test_hot")(HotEngine)
    yield "_test_hot"
    registry._ENTRIES["rollout_engine"].pop("_test_hot", None)


def test_drift_guard_stops_a_run_whose_engine_samples_at_another_temperature(tmp_path, tiny_arith_model, hot_engine):
    with pytest.raises(TrainingError, match="drift_guard.stop.*Likely causes"):
        policylab.train("grpo", run_dir=tmp_path / "hot", **{**TINY_RUN, "train.steps": 2, "rollout.engine.name": hot_engine})


def test_run_logs_drift_and_correction_metrics(tmp_path, tiny_arith_model):
    run = policylab.train("grpo", run_dir=tmp_path / "ok", **{
        **TINY_RUN, "train.steps": 2, "train.eval_size": 0, "train.drift_guard.every": 1,
        "algorithm.rollout_correction": [{"name": "tis", "cap": 2.0}, {"name": "icepop", "low": 0.5, "high": 2.0}]})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:  # the hf engine records the training forward's own distribution: tiny drift, nothing masked
        assert r["drift/abs_dlogp_mean"] < 1e-4
        assert r["rollout_corr/abs_dlogp_max"] < 1e-3 and r["rollout_corr/masked_frac"] == 0.0
        assert r["rollout_corr/weight_mean"] == pytest.approx(1.0, abs=1e-3)
