"""The training loop: sample prompts -> generate -> reward -> filter -> advantages -> update -> log.

It knows component kinds and hooks, never method names. ``train()`` is the public entry point.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from policylab import fields as F
from policylab import models, registry
from policylab.config import Recipe, load_recipe, recipe_to_dict
from policylab.interfaces import LogitsTransform, Sampling
from policylab.rollouts import PolicyOutputs, Rollouts
from policylab.sampling.dynamic import NotEnoughInformativeGroups, collect_informative_groups
from policylab.tasks import Task
from policylab.train import checkpoint, interrupt, prompt_budget
from policylab.train.components import Components, build_components, hook
from policylab.train.async_rollouts import AsyncRollouts
from policylab.train.context import TrainContext
from policylab.train.drift_guard import DriftError, check_drift, due, mean_abs_drift
from policylab.train.errors import TrainingError  # noqa: F401 - re-exported: policylab.train.loop.TrainingError
from policylab.models.forward import policy_forward, trim
from policylab.train.logging import RunLogger, batch_metrics, peak_memory_mib
from policylab.train.run_dir import RunLock
from policylab.train.trackers import Trackers, check_installed
from policylab.train.update import NonFiniteStep, micro_batch_order, update_on_batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_run_dir(recipe: Recipe) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe.name}-{Path(recipe.model.name).name}-{stamp}"


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False):
        self.run_dir = Path(run_dir)
        # first, before anything expensive: a second run or resume in this directory is refused here
        self.lock = run_dir_lock(self.run_dir)
        try:
            self._build(recipe, resume)
        except BaseException:
            self.lock.abandon()
            raise

    def _build(self, recipe: Recipe, resume: bool) -> None:
        self.recipe = recipe
        self.resumed = resume
        self.device = resolve_device(recipe.train.device)
        self.step = 0
        self.bad_steps_in_row = 0
        self.stopped: int | None = None  # the signal number after a graceful stop (see run)
        check_installed(recipe.train.report_to)  # a missing tracker library fails here, before the model loads
        if recipe.train.async_ and recipe.train.max_staleness > 0 and not recipe.algorithm.rollout_correction:
            raise TrainingError("train.async with train.max_staleness > 0 trains on batches sampled by older weights; "
                                "set algorithm.rollout_correction (e.g. [{name: tis, cap: 2.0}]) so the update is "
                                "importance-corrected against the sampling policy, or train.max_staleness=0")
        self.trackers = Trackers([], self.run_dir, {})  # run() starts the recipe's trackers
        seed_everything(recipe.train.seed)
        self.task: Task = registry.build("task", recipe.task.name, recipe.task.params, where="task")()
        self.parts: Components = build_components(recipe)
        self.parts.sampler.bind(len(self.task.train), seed=recipe.train.seed)
        m = recipe.model
        self.model, self.tokenizer = models.load(m.name, m.dtype, self.device, tiny=m.tiny, seed=recipe.train.seed)
        # train mode, so gradient checkpointing (which transformers applies only in training) takes effect;
        # dropout off, so the training forward equals the sampling forward and the on-policy ratio is 1
        self.model.train()
        models.disable_dropout(self.model)
        if m.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        self._fit_prompts()  # before any generation: prompts over the context budget, by rollout.overlong_prompt
        self.ref_model = None
        if self.parts.plan.needs_reference_model:
            self.ref_model, _ = models.load(m.name, m.dtype, self.device, tiny=m.tiny, seed=recipe.train.seed)
            self.ref_model.eval().requires_grad_(False)
        opt = recipe.optimizer
        opt_cls = registry.get("optimizer", opt.name).target
        self.optimizer = opt_cls([p for p in self.model.parameters() if p.requires_grad], **opt.params)
        warmup = recipe.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.update_generator = torch.Generator().manual_seed(recipe.train.seed + 1)
        r = recipe.rollout
        self.sampling = Sampling(r.group_size, r.temperature, r.top_p, r.top_k, r.max_new_tokens, r.generation_batch_size)
        self.parts.engine.bind(self.model, self.tokenizer)
        self.ctx = TrainContext(policy=self.model, tokenizer=self.tokenizer, reference=self.ref_model, device=self.device,
                                temperature=self._temperature(), reward=self.parts.rewards, score=self.score,
                                generate=self.generate_for, total_steps=recipe.train.steps)
        self.logger = RunLogger(self.run_dir, progress=recipe.train.progress, total_steps=recipe.train.steps)
        self.async_rollouts = None
        if resume:
            self._resume()
        elif (self.run_dir / "metrics.jsonl").exists():
            if checkpoint.checkpoints(self.run_dir):
                raise TrainingError(f"run directory {self.run_dir} already holds a run (metrics.jsonl, checkpoints/); "
                                    "continue it with --resume or choose another --run-dir (nothing was overwritten)")
            self._restart("a fresh start")
        if recipe.train.async_:  # after a resume: the generator's copy starts from the resumed weights
            self.async_rollouts = AsyncRollouts(self)
            if resume:
                self.async_rollouts.load_state_dict(getattr(self, "_resumed_state", {}).get("async") or {})  # {} after a restart
        # on resume too: an override (train.steps=200) is now the run's recipe, which `policylab show` and a
        # later resume read; written under a temporary name and renamed, so a crash keeps the previous one
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        tmp.replace(self.run_dir / "config.yaml")

    def _fit_prompts(self) -> None:
        r, cfg = self.recipe.rollout, self.recipe.train
        warn = lambda m: print(f"policylab: {m}", file=sys.stderr, flush=True)  # noqa: E731
        bound = len(self.task.train)
        for split, max_new in (("train", r.max_new_tokens), ("eval", cfg.eval_max_new_tokens or r.max_new_tokens)):
            rows = getattr(self.task, split)
            budget = prompt_budget.prompt_budget(self.model, max_new)
            if rows and budget is not None:
                setattr(self.task, split, prompt_budget.apply_policy(rows, self.tokenizer, budget, r.overlong_prompt,
                                                                      split, warn))
        if len(self.task.train) != bound:  # rows were dropped: the sampler draws from the rows left
            self.parts.sampler.bind(len(self.task.train), seed=cfg.seed)

    # -- scoring and generation services for components ------------------------------------------
    @torch.no_grad()
    def score(self, rollouts: Rollouts, model=None, with_hidden: bool = False) -> PolicyOutputs:
        """No-grad log-probs/entropies (and hidden states) of ``rollouts`` under ``model`` (default: policy)."""
        model = model or self.model
        size = self.recipe.train.micro_batch_size
        outs = []
        share = self._share_prompts()
        for rows in micro_batch_order(rollouts, size, whole_groups=share):
            micro = trim(rollouts.select(rows))
            outs.append((rows, policy_forward(model, micro, temperature=self._temperature(), chunk=self.recipe.train.logprob_chunk,
                                              with_hidden=with_hidden, share_prompts=share,
                                              packed=self.recipe.train.packed)))
        width = rollouts.completion_ids.shape[1]
        logp = torch.zeros(rollouts.batch_size, width)
        entropy = torch.zeros(rollouts.batch_size, width)
        hidden = None
        for rows, out in outs:
            t = out.logp.shape[1]
            logp[rows, :t] = out.logp.float().cpu()
            entropy[rows, :t] = out.entropy.float().cpu()
            if with_hidden:
                if hidden is None:
                    hidden = torch.zeros(rollouts.batch_size, width, out.hidden.shape[-1])
                hidden[rows, :t] = out.hidden.float().cpu()
        mask = rollouts.completion_mask
        return PolicyOutputs(logp=logp * mask, entropy=entropy * mask, hidden=hidden)

    def generate_for(self, rows: list[dict], **overrides) -> Rollouts:
        settings = Sampling(**{**self.sampling.__dict__, **overrides})
        return self.parts.engine.generate(rows, settings)

    def sampling_transforms(self) -> tuple[LogitsTransform, ...]:
        """Components' engine-neutral changes to the next generation's distribution (HAPO's temperature)."""
        out: list[LogitsTransform] = []
        for _, c in self.parts.with_hook("sampling_transforms"):
            out += list(hook(c, "sampling_transforms")() or ())
        return tuple(out)

    def _share_prompts(self) -> bool:
        cfg = self.recipe.train
        # the padded path shares prompts through a KV cache, which gradient checkpointing does not allow
        return cfg.share_prompts and (cfg.packed or not self.recipe.model.gradient_checkpointing)

    def _temperature(self) -> float:
        t = self.recipe.rollout.temperature
        return t if t > 0 else 1.0

    # -- one step --------------------------------------------------------------------------------
    def score_rewards(self, rollouts: Rollouts) -> dict[str, float]:
        rewards, components = self.parts.rewards(rollouts.prompts, rollouts.completions, rollouts.rows, rollouts=rollouts)
        rollouts.rewards, rollouts.reward_components = rewards, components
        rollouts.extras["max_new_tokens"] = self.sampling.max_new_tokens
        metrics: dict[str, float] = dict(self.parts.rewards.last_metrics())  # timeouts, non-finite values
        for shaping in self.parts.reward_shaping:
            delta, shaping_metrics = shaping(rollouts)
            rollouts.rewards = rollouts.rewards + delta
            metrics.update({k: float(v) for k, v in shaping_metrics.items()})
        return metrics

    def generate_round(self, n_prompts: int, group_offset: int, metrics: dict[str, float], *, engine=None, model=None,
                       step: int | None = None, transforms=None) -> Rollouts:
        """Sample prompts, generate G completions each and score them (one generation round). ``engine``/``model``:
        the async generator's copy (default: the trainer's); ``step``: the 0-based step the batch is for."""
        engine, model = engine or self.parts.engine, model or self.model
        step = self.step if step is None else step
        indices = self.parts.sampler.next_batch(n_prompts)
        rows = [self.task.train[i] for i in indices]
        t0 = time.perf_counter()
        transforms = self.sampling_transforms() if transforms is None else transforms
        batch = engine.generate(rows, Sampling(**{**self.sampling.__dict__, "transforms": transforms}),
                                group_offset=group_offset)
        metrics["time/generate_s"] = metrics.get("time/generate_s", 0.0) + time.perf_counter() - t0
        guard = self.recipe.train.drift_guard
        # sampling transforms (HAPO's temperature) change the behaviour distribution on purpose: nothing to guard
        if group_offset == 0 and due(step, guard.every) and batch.behavior_logp is not None and not transforms:
            drift = mean_abs_drift(batch.behavior_logp, self.score(batch, model=model).logp, batch.completion_mask)
            metrics["drift/abs_dlogp_mean"] = drift
            try:
                check_drift(drift, warn=guard.warn, stop=guard.stop, step=step + 1, warn_fn=self.logger.warn)
            except DriftError as err:
                raise TrainingError(str(err)) from None
        t0 = time.perf_counter()
        metrics.update(self.score_rewards(batch))
        metrics["time/reward_s"] = metrics.get("time/reward_s", 0.0) + time.perf_counter() - t0
        if torch.isnan(batch.rewards).all():
            raise TrainingError("every reward in the batch failed (reward functions raised or returned None); "
                                "see the warnings above for the first errors")
        accuracy = torch.nan_to_num(batch.reward_components["accuracy"], nan=0.0)
        pass_rates = [float(accuracy[batch.group == group_offset + k].mean()) for k in range(len(indices))]
        self.parts.sampler.update({"index": indices, "pass_rate": pass_rates, "step": step})
        return batch

    def collect(self, **source) -> tuple[Rollouts, dict[str, float]]:
        """One scored batch; with a group filter, DAPO dynamic sampling (data_agents_eval.md A1). ``source``:
        generate_round's engine/model/step/transforms (the async generator passes its own)."""
        cfg, rollout_cfg = self.recipe.train, self.recipe.rollout
        metrics: dict[str, float] = {}
        if self.parts.group_filter is None:
            batch = self.generate_round(cfg.prompts_per_step, 0, metrics, **source)
            metrics["groups/filtered_frac"] = 0.0
            return batch, metrics
        per_round = rollout_cfg.gen_prompts_per_round or cfg.prompts_per_step
        try:
            batch, stats = collect_informative_groups(
                lambda r: self.generate_round(per_round, r * per_round, metrics, **source),
                self.parts.group_filter, cfg.prompts_per_step, rollout_cfg.max_gen_batches)
        except NotEnoughInformativeGroups as err:
            raise TrainingError(str(err)) from None
        metrics.update(stats)
        return batch, metrics

    def prepare(self, batch: Rollouts) -> Rollouts:
        """Annotators and batch transforms in the planned order (train/stages.py), then the advantage."""
        if self.recipe.algorithm.mask_truncated:
            batch.completion_mask = batch.completion_mask * (~batch.truncated)[:, None].float()
        for node in self.parts.plan.prepare:
            if node.hook == "transform":
                batch = hook(node.component, "transform")(batch, self.ctx)
                missing = [f for f in node.provides if not _has_field(batch, f)]
                if missing:
                    raise TrainingError(f"{node.label} declares it provides {missing} but its transform did not set them")
            else:
                batch = apply_annotations(batch, hook(node.component, "annotate")(batch, self.ctx), node)
            batch.validate(node.label)
        cfg = self.recipe.train
        if cfg.updates_per_batch > 1 or cfg.mini_batches > 1:
            # off-policy after the first optimizer step: freeze the pre-update log-probs
            batch.old_logp = self.score(batch).logp
        batch.advantages = self.parts.advantage(batch)
        return batch

    def train_step(self) -> dict[str, Any]:
        t_step, cpu_step = time.perf_counter(), time.process_time()
        cfg = self.recipe.train
        self.ctx.step = self.step
        batch, metrics = self.async_rollouts.next() if self.async_rollouts else self.collect()
        batch = self.prepare(batch)
        t0 = time.perf_counter()
        parts = self.parts.update
        self.parts.engine.sleep()
        try:
            update_metrics = update_on_batch(
                self.model, self.optimizer, self.scheduler, batch, parts, mini_batches=cfg.mini_batches,
                updates=cfg.updates_per_batch, micro_size=cfg.micro_batch_size, max_len=self.sampling.max_new_tokens,
                grad_clip=cfg.grad_clip, temperature=self._temperature(), chunk=cfg.logprob_chunk,
                generator=self.update_generator, share_prompts=self._share_prompts(), packed=cfg.packed)
            self.bad_steps_in_row = 0
        except NonFiniteStep as err:
            self.bad_steps_in_row += 1
            update_metrics = {"skipped_nonfinite": 1.0}
            self.logger.warn(f"step {self.step + 1}: {err}; step skipped ({self.bad_steps_in_row} in a row)")
        self.parts.engine.wake()
        self.parts.engine.update_weights(self.model)
        metrics["time/update_s"] = time.perf_counter() - t0
        metrics.update(update_metrics)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        for _, component in self.parts.with_hook("after_step"):
            hook(component, "after_step")(metrics)
        for key, component in self.parts.with_hook("last_metrics"):  # stateful components report what they saw
            metrics.update({k: float(v) for k, v in (hook(component, "last_metrics") or {}).items()})
        self.step += 1
        metrics.update(batch_metrics(batch))
        step_s = time.perf_counter() - t_step
        metrics["time/step_s"] = step_s
        metrics["time/step_cpu_s"] = time.process_time() - cpu_step  # all threads; barely moved by other load
        metrics["tokens_per_s"] = float(batch.completion_mask.sum()) / step_s
        metrics["memory/peak_mib"] = peak_memory_mib(self.device)
        metrics["step"] = self.step
        self.logger.log_step(self.step, metrics, batch, cfg.log_samples)
        self.trackers.log(self.step, metrics)
        if self.bad_steps_in_row >= cfg.max_bad_steps:
            raise TrainingError(f"{self.bad_steps_in_row} consecutive steps had a non-finite loss or gradient; "
                                "stopping (lower the learning rate or check the recipe)")
        return metrics

    # -- eval, checkpoint, resume ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cfg = self.recipe.train
        rows = self.task.eval[: cfg.eval_size]
        if not rows:
            return {}
        if self.async_rollouts:  # eval reseeds the global RNG stream the generator thread draws from
            self.async_rollouts.quiesce()
        max_new = cfg.eval_max_new_tokens or self.sampling.max_new_tokens
        state = torch.get_rng_state()  # evaluation must not move the training sampling RNG stream
        torch.manual_seed(cfg.seed + 7919 * (self.step + 1))  # seeded per step: comparable across recipes
        out = {"eval/n": float(len(rows))}
        runs = [("", Sampling(1, 0.0, 1.0, 0, max_new, self.sampling.batch_size))]
        if cfg.eval_samples:
            s = self.sampling
            runs.append(("_sampled", Sampling(cfg.eval_samples, s.temperature, s.top_p, s.top_k, max_new, s.batch_size)))
        for suffix, settings in runs:
            batch = self.parts.engine.generate(rows, settings)
            _, components = self.parts.rewards(batch.prompts, batch.completions, batch.rows, rollouts=batch)
            out[f"eval/accuracy{suffix}"] = float(torch.nan_to_num(components["accuracy"], nan=0.0).mean())
            out[f"eval/completion_length{suffix}"] = float(batch.completion_mask.sum(-1).float().mean())
        torch.set_rng_state(state)
        return out

    def trainer_state(self) -> dict[str, Any]:
        # first: the batches in flight finish (their RNG draws and sampler updates belong to this checkpoint)
        pending = self.async_rollouts.state_dict() if self.async_rollouts else None
        return {"async": pending, "step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state(), "update_generator": self.update_generator.get_state(),
                "components": self.parts.state_dict(), "bad_steps_in_row": self.bad_steps_in_row}

    def save(self) -> Path:
        return checkpoint.save(self.run_dir, self.step, self.model, self.tokenizer, self.trainer_state())

    def _restart(self, how: str) -> None:
        """A run that crashed before its first checkpoint: nothing to resume, so start it over; its logged lines
        move to metrics.discarded.jsonl (train/logging.py)."""
        self.logger.warn(f"{how} in {self.run_dir}: it holds no checkpoint (the run ended before its first one), "
                         "so training starts over from step 0; its logged lines move to metrics.discarded.jsonl")
        self.logger.truncate_after(-1)

    def _resume(self) -> None:
        path = checkpoint.latest_intact(self.run_dir, self.logger.warn)
        if path is None:
            self._restart("--resume")
            self.resumed = False
            return
        from safetensors.torch import load_file

        weights = {}
        for f in sorted(path.glob("*.safetensors")):
            weights.update(load_file(f))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise TrainingError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.model.tie_weights()
        state = checkpoint.load_trainer_state(path)
        self._resumed_state = state
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.update_generator.set_state(state["update_generator"])
        self.parts.load_state_dict(state["components"])
        self.bad_steps_in_row = state.get("bad_steps_in_row", 0)
        self.step = state["step"]
        checkpoint.set_rng_state(state["rng"])
        self.logger.truncate_after(self.step)

    def run(self) -> Path:
        """Train to ``train.steps``, evaluate, checkpoint; returns the run directory.

        The first SIGINT/SIGTERM stops at the next step boundary: a checkpoint, ``RUN_DIR/stopped.json``, one
        line on stderr with the resume command, ``self.stopped`` set to the signal number, a normal return. A
        second signal raises KeyboardInterrupt at once; the last complete checkpoint stays usable."""
        cfg = self.recipe.train
        if self.resumed and self.step >= cfg.steps:  # resuming a finished run: no second final eval or save
            self.lock.release()
            print(f"policylab: run {self.run_dir} already finished at step {self.step} of {cfg.steps}; nothing to do "
                  f"(to train further: {interrupt.resume_command(self.run_dir)} train.steps=N)", file=sys.stderr, flush=True)
            return self.run_dir
        interrupt.clear_marker(self.run_dir)  # a resumed run is no longer a stopped one
        saves = checkpoint.SaveSchedule(cfg.save_every, cfg.steps)  # train.save_every; 'auto' by default
        self.logger.start(self.step)
        self.trackers = Trackers(cfg.report_to, self.run_dir, recipe_to_dict(self.recipe), resume_step=self.step,
                                 warn=self.logger.warn)
        stop = interrupt.GracefulStop()
        saved_at, message = -1, None

        def log_eval(step: int, metrics: dict[str, float]) -> None:
            self.logger.log_eval(step, metrics)
            self.trackers.log(step, metrics)

        try:
            with stop:
                if cfg.eval_every and cfg.eval_size and self.step == 0:
                    log_eval(0, self.evaluate())
                while self.step < cfg.steps and not stop.requested:
                    self.train_step()
                    if stop.requested:
                        break  # stop quickly: no periodic eval, only the checkpoint below
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        log_eval(self.step, self.evaluate())
                    if self.step < cfg.steps and saves.due(self.step):
                        saves.run(self.save)
                        saved_at = self.step
                if stop.requested and self.step < cfg.steps:
                    if saved_at != self.step:
                        self.save()
                    interrupt.write_marker(self.run_dir, self.step, stop.signum)
                    self.stopped = stop.signum
                    message = f"stopped at step {self.step}; resume with: {interrupt.resume_command(self.run_dir)}"
                else:
                    if cfg.eval_size:
                        log_eval(self.step, self.evaluate())
                    self.save()
        except KeyboardInterrupt as err:
            last = checkpoint.latest(self.run_dir)
            message = f"aborted in step {self.step + 1}; " + (
                f"the last checkpoint is {last.name}; resume with: {interrupt.resume_command(self.run_dir)}"
                if last is not None else "no checkpoint was written")
            err.policylab_reported = True  # the CLI adds no second line
            raise
        finally:
            if self.async_rollouts:
                self.async_rollouts.close()
            self.parts.engine.close()
            self.logger.close()
            self.trackers.close()
            self.lock.release()
            if message:  # after the progress bar is gone, so the line stays readable
                print(f"policylab: {message}", file=sys.stderr, flush=True)
        return self.run_dir


def run_dir_lock(directory: Path) -> RunLock:
    return RunLock.acquire(directory, warn=lambda m: print(f"policylab: {m}", file=sys.stderr, flush=True))


def _has_field(batch: Rollouts, name: str) -> bool:
    return getattr(batch, name, None) is not None if name in F.CORE_FIELDS else name in batch.extras


def apply_annotations(batch: Rollouts, values: dict[str, Any], node) -> Rollouts:
    """Write an annotator's result into the batch: exactly its declared ``provides``, nothing else."""
    values = dict(values or {})
    undeclared = sorted(set(values) - set(node.provides))
    missing = sorted(set(node.provides) - set(values))
    if undeclared or missing:
        raise TrainingError(f"{node.label} returned fields {sorted(values)} but declares provides={list(node.provides)}"
                            + (f"; undeclared: {undeclared}" if undeclared else "") + (f"; missing: {missing}" if missing else ""))
    extras = dict(batch.extras)
    core = {}
    for name, value in values.items():
        if name in F.CORE_FIELDS:
            core[name] = value
        else:
            extras[name] = value
    return batch.with_(extras=extras, **core)


def _as_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Accept nested dicts, dotted keys, or '__' for dots (train_steps is not ambiguous: train__steps)."""
    flat: dict[str, Any] = {}

    def walk(prefix, value):
        if isinstance(value, dict) and not ("name" in value and prefix.count(".") >= 1):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    for key, value in overrides.items():
        walk(key.replace("__", "."), value)
    return flat


SHORTCUTS = {"model": "model.name", "task": "task.name", "steps": "train.steps", "seed": "train.seed"}


def train(recipe: str | Recipe = "grpo", *, run_dir: str | Path | None = None, resume: bool = False,
          reward_funcs: list | None = None, reward_weights: list[float] | None = None, **overrides) -> Path:
    """Train with a recipe (name, YAML path or Recipe). Overrides: dotted keys (``**{"train.steps": 3}``),
    ``train__steps=3``, nested dicts, or the shortcuts model=, task=, steps=, seed=. Returns the run directory.

    ``task=`` also takes a data file, a datasets folder or a hub id (tasks/hf_datasets.py). ``reward_funcs``
    (as TRL's GRPOTrainer): your functions, callables or import paths ``file.py:fn`` / ``pkg.mod:fn``, replacing
    the recipe's rewards (rewards/user.py), with ``reward_weights`` (one per reward, default 1). A resume
    needs a lambda or local function passed again. The rewards, the task name and the model name are checked
    before the task or the model loads.

    Ctrl-C or SIGTERM stops at the next step boundary with a checkpoint and returns the run directory as
    usual; such a run holds ``RUN_DIR/stopped.json`` (step, signal, resume command) until it is resumed."""
    from policylab.rewards import user as user_rewards
    from policylab.tasks.hf_datasets import task_for_name

    flat = {SHORTCUTS.get(k, k): v for k, v in _as_overrides(overrides).items()}
    if "task.name" in flat:
        spec = task_for_name(str(flat["task.name"]), registry.names("task"))
        if spec is not None:  # the data's task first, so task.* overrides (eval_fraction, ...) apply on top
            flat.pop("task.name")
            flat = {"task": spec, **flat}
    passed: dict[str, Any] = {}
    if reward_funcs is not None:
        if any(k == "rewards" or k.startswith("rewards.") for k in flat):
            raise TrainingError("give the rewards either as reward_funcs= or as rewards overrides, not both")
        entries, passed = user_rewards.reward_entries(reward_funcs, reward_weights)
        flat = {"rewards": entries, **flat}
    elif reward_weights is not None:
        flat.update({f"rewards.{i}.weight": float(w) for i, w in enumerate(reward_weights)})
    with user_rewards.passed_callables(passed):
        if resume:
            if run_dir is None:
                raise TrainingError("resume needs the run directory")
            saved = Path(run_dir) / "config.yaml"
            if not saved.exists():
                raise TrainingError(f"--resume {run_dir}: no config.yaml there; is it a policylab run directory?")
            rec = load_recipe(str(saved), flat)  # the run's own recipe; overrides may extend train.steps
        elif isinstance(recipe, Recipe):
            rec = recipe
        else:
            rec = load_recipe(recipe, flat)
        if reward_weights is not None and len(reward_weights) != len(rec.rewards):
            raise TrainingError(f"reward_weights has {len(reward_weights)} values for {len(rec.rewards)} rewards")
        user_rewards.check_user_rewards(rec.rewards)  # a missing reward file or function fails here
        models.check_model_name(rec.model.name)  # a misspelled name or an offline hub id: now, not after retries
        directory = Path(run_dir) if run_dir else default_run_dir(rec)
        trainer = Trainer(rec, directory, resume=resume)
        return trainer.run()


models.quiet_transformers()  # per-file progress bars of save_pretrained would drown the run's progress line

if os.environ.get("POLICYLAB_DETERMINISTIC"):
    torch.use_deterministic_algorithms(True)
