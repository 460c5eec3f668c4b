"""Async one-step-off-policy rollouts (train/async_rollouts.py): K=0 is the synchronous loop, K=1 trains on
batches exactly one version old, resume is exact, a batch over the staleness bound is dropped and counted."""

import json
import shutil

import pytest

import policylab
from policylab.train.async_rollouts import sampling_version
from policylab.train.loop import TrainingError
from tests.conftest import TINY_RUN

VOLATILE = ("time/", "tokens_per_s", "memory/", "async/wait_s")
CORRECTION = {"algorithm.rollout_correction": [{"name": "tis", "cap": 2.0}]}


def _metrics(run, drop=()):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE + tuple(drop))} for r in rows]


def test_sampling_schedule():
    assert [sampling_version(j, 0) for j in range(1, 5)] == [0, 1, 2, 3]
    assert [sampling_version(j, 1) for j in range(1, 5)] == [0, 0, 1, 2]
    assert [sampling_version(j, 2) for j in range(1, 6)] == [0, 0, 0, 1, 2]


def test_async_k0_reproduces_the_synchronous_loop(tmp_path, tiny_arith_model):
    settings = {**TINY_RUN, **CORRECTION, "train.steps": 3, "train.eval_every": 2}
    sync = policylab.train("grpo", run_dir=tmp_path / "sync", **settings)
    k0 = policylab.train("grpo", run_dir=tmp_path / "k0", **{**settings, "train.async": True, "train.max_staleness": 0})
    a, b = _metrics(sync), _metrics(k0, drop=("async/",))
    assert a == b
    assert all(r["async/staleness"] == 0 for r in _metrics(k0) if "loss" in r)


def test_async_k1_trains_one_version_behind_and_corrects_it(tmp_path, tiny_arith_model):
    run = policylab.train("grpo", run_dir=tmp_path / "k1", **{**TINY_RUN, **CORRECTION, "train.steps": 4, "train.eval_size": 0,
                                                             "train.async": True, "train.max_staleness": 1,
                                                             "optimizer.lr": 1e-3})
    rows = [r for r in _metrics(run) if "loss" in r]
    assert [r["async/staleness"] for r in rows] == [0, 1, 1, 1]
    assert all(r["async/dropped_stale"] == 0 for r in rows)
    # the first batch is on-policy; later ones were sampled by the previous weights, so the correction sees a gap
    assert rows[0]["rollout_corr/abs_dlogp_mean"] < 1e-4
    assert min(r["rollout_corr/abs_dlogp_mean"] for r in rows[1:]) > 1e-3


def test_async_resume_is_exact_and_a_smaller_bound_drops_the_stale_batch(tmp_path, tiny_arith_model):
    settings = {**TINY_RUN, **CORRECTION, "train.eval_size": 0, "train.async": True, "train.max_staleness": 1}
    full = policylab.train("grpo", run_dir=tmp_path / "full", **{**settings, "train.steps": 4})
    half = policylab.train("grpo", run_dir=tmp_path / "half", **{**settings, "train.steps": 2})
    shutil.copytree(half, tmp_path / "half_k0")
    policylab.train("grpo", run_dir=half, resume=True, **{"train.steps": 4})
    assert _metrics(full) == _metrics(half)
    # the checkpoint holds batch 3, sampled by version 1; resumed at version 2 with K=0 it is one version too old
    policylab.train("grpo", run_dir=tmp_path / "half_k0", resume=True, **{"train.steps": 3, "train.max_staleness": 0})
    last = _metrics(tmp_path / "half_k0")[-1]
    assert last["step"] == 3 and last["async/dropped_stale"] == 1 and last["async/staleness"] == 0


def test_async_without_a_correction_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="rollout_correction"):
        policylab.train("grpo", run_dir=tmp_path / "x", **{**TINY_RUN, "train.steps": 1, "train.async": True})


def test_a_synchronous_run_resumes_asynchronously(tmp_path, tiny_arith_model):
    settings = {**TINY_RUN, **CORRECTION, "train.eval_size": 0}
    run = policylab.train("grpo", run_dir=tmp_path / "run", **{**settings, "train.steps": 2})
    policylab.train("grpo", run_dir=run, resume=True, **{"train.steps": 4, "train.async": True})
    rows = [r for r in _metrics(run) if "loss" in r]
    assert [r.get("async/staleness") for r in rows] == [None, None, 0, 1]
