"""The update step: mini-batches, length-bucketed micro-batches, objective + regularizers + token
weights, global aggregation, gradient clipping, one optimizer step per mini-batch.

This module knows component *kinds* only; which objective or regularizer runs is the recipe's business.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from policylab.rollouts import Normaliser, Rollouts
from policylab.models.forward import policy_forward, trim


@dataclass
class UpdateComponents:
    objective: object
    aggregate: object
    regularizers: list = field(default_factory=list)
    token_weights: list = field(default_factory=list)
    rollout_correction: list = field(default_factory=list)  # behaviour/training mismatch factors

    def wants(self, attribute: str) -> bool:
        return any(getattr(c, attribute, False) for c in [self.objective, *self.regularizers, *self.token_weights])


MAX_SUFFIX = "_max"  # metric keys reduced by max over micro-batches, not token-weighted means (rollout_corr/...)


class NonFiniteStep(RuntimeError):
    pass


def micro_batch_order(batch: Rollouts, size: int, whole_groups: bool = False) -> list[torch.Tensor]:
    """Row indices of each micro-batch. By default rows are sorted by total length and cut every
    ``size`` rows, so similar lengths share a micro-batch and little compute goes to padding; any
    partition is exact because normalisers are global. ``whole_groups`` (a component's
    ``needs_whole_groups``) cuts only at group boundaries, packing whole groups up to ``size`` rows."""
    if not whole_groups:
        total = batch.prompt_mask.sum(-1) + batch.completion_mask.sum(-1)
        order = torch.argsort(total, stable=True)
        return [order[i:i + size] for i in range(0, batch.batch_size, size)]
    parts, current = [], []
    for g in torch.unique(batch.group):
        rows = (batch.group == g).nonzero().flatten().tolist()
        if current and len(current) + len(rows) > size:
            parts.append(torch.tensor(current))
            current = []
        current += rows
    if current:
        parts.append(torch.tensor(current))
    return parts


def micro_batches(batch: Rollouts, size: int, whole_groups: bool = False) -> list[Rollouts]:
    return [trim(batch.select(rows)) for rows in micro_batch_order(batch, size, whole_groups)]


def mini_batch_split(batch: Rollouts, n: int, generator: torch.Generator, whole_groups: bool) -> list[Rollouts]:
    """``n`` optimizer mini-batches of a shuffled batch (shuffled by group when groups must stay whole)."""
    if n == 1:
        return [batch]
    if not whole_groups:
        order = torch.randperm(batch.batch_size, generator=generator)
        return [batch.select(rows) for rows in torch.tensor_split(order, n)]
    groups = torch.unique(batch.group)
    shuffled = groups[torch.randperm(groups.numel(), generator=generator)]
    return [batch.select(torch.isin(batch.group, chunk)) for chunk in torch.tensor_split(shuffled, n)]


def micro_batch_loss(model, micro: Rollouts, parts: UpdateComponents, norm: Normaliser, *, temperature: float,
                     chunk: int, share_prompts: bool = False, packed: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    device = next(model.parameters()).device
    micro = micro.to(device)
    out = policy_forward(model, micro, temperature=temperature, chunk=chunk, with_hidden=parts.wants("needs_hidden"),
                         share_prompts=share_prompts, packed=packed)
    if not parts.wants("needs_entropy_grad"):
        out.entropy = out.entropy.detach()
    loss_tok, metrics = parts.objective(out, micro)
    # token weights select which tokens the policy-gradient term learns from (EARL, VPPO, ...);
    # regularizers keep acting on every trained token, so weights apply before they are added
    for weighting in parts.token_weights:
        weights, w_metrics = weighting(out, micro)
        loss_tok = loss_tok * weights
        metrics.update(w_metrics)
    # the rollout correction reweights the same policy-gradient term (TIS/MIS act on the surrogate, not on KL terms)
    for correction in parts.rollout_correction:
        factors, c_metrics = correction(out, micro)
        loss_tok = loss_tok * factors.detach()
        metrics.update(c_metrics)
    for reg in parts.regularizers:
        extra, reg_metrics = reg(out, micro)
        loss_tok = loss_tok + extra
        metrics.update(reg_metrics)
    mask = micro.completion_mask
    loss = parts.aggregate(loss_tok, mask, norm)
    tokens = mask.sum().clamp(min=1)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["entropy"] = float((out.entropy.detach() * mask).sum() / tokens)
    return loss, metrics


def update_on_batch(model, optimizer, scheduler, batch: Rollouts, parts: UpdateComponents, *, mini_batches: int,
                    updates: int, micro_size: int, max_len: int, grad_clip: float, temperature: float, chunk: int,
                    generator: torch.Generator, share_prompts: bool = False, packed: bool = True) -> dict[str, float]:
    """mu passes over the batch, each split into ``mini_batches`` optimizer steps. Returns averaged metrics.

    Raises NonFiniteStep (after zeroing gradients, without stepping) when a loss or gradient is not finite.
    """
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    grad_norms, losses = [], []
    maxima: dict[str, float] = {}
    whole_groups = parts.wants("needs_whole_groups")
    # prefix sharing pays only when a micro-batch holds several rows of one prompt: cut at group boundaries
    micro_whole_groups = whole_groups or share_prompts
    for _ in range(updates):
        for mini in mini_batch_split(batch, mini_batches, generator, whole_groups):
            norm = Normaliser.of(mini.completion_mask, max_len)
            optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            for micro in micro_batches(mini, micro_size, micro_whole_groups):
                loss, metrics = micro_batch_loss(model, micro, parts, norm, temperature=temperature, chunk=chunk,
                                                 share_prompts=share_prompts, packed=packed)
                if not torch.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteStep(f"non-finite loss {float(loss.detach())}")
                loss.backward()
                total_loss += float(loss.detach())
                w = float(micro.completion_mask.sum())
                for k, v in metrics.items():
                    if math.isfinite(v) and k.endswith(MAX_SUFFIX):  # a maximum stays a maximum across micro-batches
                        maxima[k] = max(v, maxima.get(k, v))
                    elif math.isfinite(v):
                        sums[k] += v * w
                        weights[k] += w
            params = [p for p in model.parameters() if p.grad is not None]
            norm_value = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            if not torch.isfinite(norm_value):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteStep(f"non-finite gradient norm {float(norm_value)}")
            optimizer.step()
            scheduler.step()
            grad_norms.append(float(norm_value))
            losses.append(total_loss)
    out = {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
    out.update(maxima)
    out["loss"] = sum(losses) / len(losses)
    out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    out["optimizer_steps"] = float(len(losses))
    return out
