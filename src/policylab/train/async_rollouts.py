"""Asynchronous (one-step-off-policy) rollouts: ``train.async: true``, ``train.max_staleness: K``.

A background thread owns a second copy of the policy and its own rollout engine and generates the next batches
while the trainer updates on the current one (torch releases the GIL inside ops, so both run at once on CPU).
The schedule is fixed, so runs are reproducible: batch j (1-based) is sampled by policy version
v(j) = max(0, j - 1 - K), the weights after v(j) training steps, and is submitted as soon as that version exists;
its staleness when trained is (j - 1) - v(j) = min(j - 1, K). K = 0 is the synchronous loop (generate, then
train) on the copy, with identical metrics. The behaviour log-probs a batch carries are those of the policy that
sampled it, which is what ``algorithm.rollout_correction`` corrects against; with K >= 1 the loop requires one.

A batch whose staleness exceeds K (a checkpoint written with a larger K and resumed with a smaller one) is
dropped, counted in ``async/dropped_stale`` and regenerated with the current weights. Checkpoints hold the
batches in flight (generated to completion first), so a resume continues the same schedule exactly.
"""

from __future__ import annotations

import dataclasses

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from policylab import registry
from policylab.rollouts import Extras, Rollouts


@dataclass
class Pending:
    index: int  # 1-based batch index (the train step that will consume it)
    version: int  # policy version (training steps done) whose weights sampled it
    future: Future


def sampling_version(index: int, max_staleness: int) -> int:
    """v(j) = max(0, j - 1 - K): the policy version that samples batch j."""
    return max(0, index - 1 - max_staleness)


class AsyncRollouts:
    """The generator thread, its weight copy, and the queue of batches in flight (see the module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.max_staleness = trainer.recipe.train.max_staleness
        # a plain deep copy: requires_grad_(False) would change kernel choices and the last bits of the log-probs
        # (generation runs under no_grad anyway)
        self.model = copy.deepcopy(trainer.model)
        spec = trainer.recipe.rollout.engine
        self.engine = registry.build("rollout_engine", spec.name, spec.params, where="rollout.engine (async copy)")
        self.engine.bind(self.model, trainer.tokenizer)
        self.loaded_version = trainer.step  # the copy was taken from the trainer's current weights
        # the intra-op thread count is per OS thread: the generator uses the trainer's, so its kernels reduce in the
        # same order and K=0 reproduces the synchronous loop bit for bit
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policylab-rollouts",
                                       initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        self.pending: list[Pending] = []
        self.next_index = trainer.step + 1
        self.dropped = 0

    # -- the generator thread ----------------------------------------------------------------------
    def _job(self, index: int, version: int, weights: dict[str, torch.Tensor] | None, transforms) -> tuple:
        if weights is not None and version != self.loaded_version:
            self.model.load_state_dict(weights, strict=False)
            self.loaded_version = version
            self.engine.update_weights(self.model)
        batch, metrics = self.trainer.collect(engine=self.engine, model=self.model, step=index - 1, transforms=transforms)
        return batch, metrics

    def _submit(self, index: int, version: int) -> Pending:
        current = self.trainer.step
        if version != current:
            raise RuntimeError(f"async rollouts: batch {index} needs policy version {version}, the trainer is at {current}")
        # a snapshot: the trainer goes on updating its weights while the thread loads them
        weights = None if version == self.loaded_version else {k: v.detach().clone() for k, v in
                                                               self.trainer.model.state_dict().items()}
        future = self.pool.submit(self._job, index, version, weights, self.trainer.sampling_transforms())
        return Pending(index, version, future)

    # -- the trainer's side ------------------------------------------------------------------------
    def next(self) -> tuple[Any, dict[str, float]]:
        """The batch for the coming training step, after submitting every batch whose sampling version exists."""
        k = self.trainer.step + 1
        # past train.steps too: a finished run extended with --resume then continues the same schedule
        while self.next_index <= k + self.max_staleness:
            j = self.next_index
            if sampling_version(j, self.max_staleness) > self.trainer.step:
                break
            # after a resume with a larger K, batches due at older versions are sampled by the current one
            self.pending.append(self._submit(j, self.trainer.step))
            self.next_index += 1
        if not self.pending or self.pending[0].index != k:
            self.pending.insert(0, self._submit(k, self.trainer.step))
            self.next_index = max(self.next_index, k + 1)
        head = self.pending.pop(0)
        t0 = time.perf_counter()
        batch, metrics = head.future.result()
        wait = time.perf_counter() - t0
        staleness = self.trainer.step - head.version
        if staleness > self.max_staleness:
            self.dropped += 1
            self.trainer.logger.warn(f"step {k}: batch sampled by policy version {head.version} is {staleness} versions "
                                     f"old (train.max_staleness={self.max_staleness}); dropped and regenerated")
            retry = self._submit(k, self.trainer.step)
            batch, metrics = retry.future.result()
            staleness = 0
        metrics = dict(metrics)
        metrics.update({"async/staleness": float(staleness), "async/dropped_stale": float(self.dropped),
                        "async/wait_s": wait})
        return batch, metrics

    def quiesce(self) -> None:
        """Wait until every batch in flight is generated (before eval and checkpoints touch shared state)."""
        for p in self.pending:
            p.future.result()

    def state_dict(self) -> dict[str, Any]:
        self.quiesce()
        # Rollouts as a plain dict: checkpoints load with torch.load(weights_only=True), which refuses classes
        return {"pending": [(p.index, p.version, _plain(b), m) for p in self.pending for b, m in [p.future.result()]],
                "next_index": self.next_index, "dropped": self.dropped, "max_staleness": self.max_staleness}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = []
        for index, version, batch, metrics in state.get("pending", []):
            done: Future = Future()
            done.set_result((_rollouts(batch), metrics))
            self.pending.append(Pending(index, version, done))
        self.next_index = state.get("next_index", self.trainer.step + 1)
        self.dropped = state.get("dropped", 0)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _plain(batch: Rollouts) -> dict[str, Any]:
    out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    out["extras"] = dict(batch.extras)
    return out


def _rollouts(data: dict[str, Any] | Rollouts) -> Rollouts:
    if isinstance(data, Rollouts):
        return data
    return Rollouts(**{**data, "extras": Extras(data.get("extras") or {})})
