"""Self-distillation objectives: SDPO (objectives.md §4.1) and SRPO (§4.2), with the teacher they share.

The teacher is the same network (an EMA copy by default) conditioned on a *reprompt*: the original prompt
plus a successful rollout of the same prompt. It scores the student's own completion tokens; the student is
pulled toward the teacher's log-probs on those tokens (sampled-token reverse KL). The teacher pass runs in
the objective's ``prepare`` hook with ``ctx.score(..., model=teacher)`` and leaves, per row:
``extras["teacher_logp"]`` [B,T], ``extras["teacher_entropy"]`` [B,T], ``extras["distill_mask"]`` [B] bool.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from policylab.algo.objectives import masked_mean, old_logp_of, ppo_clip_loss
from policylab.algo.objectives_supervised.common import part_scales
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts

# Our wording; the spec names the parts: prompt, a successful rollout, (feedback), "Correctly solve the original question."
DEFAULT_REPROMPT = "{prompt}\n\nHere is a correct solution to this problem:\n{solution}\n\nCorrectly solve the original question."
TEACHERS = ("ema", "current", "reference")


def teacher_demonstrations(rewards: Tensor, group: Tensor, candidates: Tensor, *, success_threshold: float = 1.0,
                           exclude_self: bool = True) -> Tensor:
    """[B] index of the successful sibling whose text becomes row i's teacher context, -1 = none (§4.1).

    A row gets one only if it is a candidate and its prompt has a rollout with reward >= success_threshold
    (other than itself when ``exclude_self``, TRL's dont_reprompt_on_self_success). The first such row is used.
    """
    r = torch.nan_to_num(rewards.float(), nan=float("-inf"))
    success = r >= success_threshold
    demo = torch.full((len(r),), -1, dtype=torch.long)
    for i in candidates.nonzero().flatten().tolist():
        ok = success & (group == group[i])
        if exclude_self:
            ok[i] = False
        found = ok.nonzero().flatten()
        if found.numel():
            demo[i] = found[0]
    return demo


def reprompt_text(formatted_prompt: str, original_prompt: str, solution: str, template: str = DEFAULT_REPROMPT) -> str:
    """The teacher's prompt: ``template`` filled in, put where the original prompt sat in the formatted prompt
    (so a chat template / system prompt the engine applied is kept)."""
    content = template.format(prompt=original_prompt, solution=solution)
    if original_prompt and original_prompt in formatted_prompt:
        return formatted_prompt.replace(original_prompt, content, 1)
    return content


def sdpo_token_losses(logp: Tensor, teacher_logp: Tensor, old_logp: Tensor, is_clip: float = 2.0) -> Tensor:
    """Sampled-token reverse KL (§4.1): l_t = sg(logp_s - logp_T) * logp_s * sg(min(pi_s/pi_old, is_clip))."""
    is_weight = torch.exp((logp - old_logp).clamp(-20.0, 20.0)).clamp(max=is_clip).detach()
    return (logp - teacher_logp).detach() * logp * is_weight


def entropy_weights(teacher_entropy: Tensor, token_mask: Tensor, temperature: float) -> Tensor:
    """w = exp(-H^T / tau_H), normalised so its mean over ``token_mask`` tokens is 1 (§4.2, reconstructed)."""
    w = torch.exp(-teacher_entropy / temperature) * token_mask
    mean = w.sum() / token_mask.sum().clamp(min=1)
    return torch.where(mean > 0, w / mean.clamp(min=1e-30), w)


class SelfDistillationTeacher:
    """Builds reprompts, scores the rollouts under the teacher, keeps the EMA teacher up to date."""

    def __init__(self, *, teacher: str, ema_rate: float, success_threshold: float, exclude_self: bool, template: str):
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        if not 0 < ema_rate <= 1:
            raise ValueError(f"ema_rate must be in (0, 1], got {ema_rate}")
        if "{prompt}" not in template or "{solution}" not in template:
            raise ValueError("reprompt_template must contain the placeholders {prompt} and {solution}")
        self.kind, self.ema_rate, self.success_threshold = teacher, ema_rate, success_threshold
        self.exclude_self, self.template = exclude_self, template
        self.model = None  # the EMA copy
        self.student = None
        self.pending_state = None

    def teacher_model(self, ctx):
        if self.kind == "current":
            return ctx.model
        if self.kind == "reference":
            if ctx.ref_model is None:
                raise ValueError("teacher='reference' needs the reference model (ctx.ref_model)")
            return ctx.ref_model
        if self.model is None:
            self.model = copy.deepcopy(ctx.model).eval().requires_grad_(False)
            if self.pending_state is not None:
                self.model.load_state_dict(self.pending_state)
                self.pending_state = None
        self.student = ctx.model
        return self.model

    @torch.no_grad()
    def fill(self, rollouts: Rollouts, ctx, candidates: Tensor) -> Rollouts:
        b, t = rollouts.completion_ids.shape
        demo = teacher_demonstrations(rollouts.rewards, rollouts.group, candidates,
                                      success_threshold=self.success_threshold, exclude_self=self.exclude_self)
        rows = (demo >= 0).nonzero().flatten()
        teacher_logp, teacher_entropy = torch.zeros(b, t), torch.zeros(b, t)
        if rows.numel():
            texts = []
            for i in rows.tolist():
                row = rollouts.rows[i] if rollouts.rows else {}
                formatted = rollouts.prompts[i] if rollouts.prompts else row.get("prompt", "")
                texts.append(reprompt_text(formatted, row.get("prompt", formatted), rollouts.completions[int(demo[i])],
                                           self.template))
            prompt_ids, prompt_mask = left_padded(ctx.tokenizer, texts)
            teacher_batch = rollouts.select(rows).with_(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
            scored = ctx.score(teacher_batch, model=self.teacher_model(ctx))
            teacher_logp[rows] = scored.logp.float()
            if scored.entropy is not None:
                teacher_entropy[rows] = scored.entropy.float()
        rollouts.extras["teacher_logp"] = teacher_logp
        rollouts.extras["teacher_entropy"] = teacher_entropy
        rollouts.extras["distill_mask"] = demo >= 0
        return rollouts

    @torch.no_grad()
    def ema_update(self) -> None:
        if self.kind != "ema" or self.model is None or self.student is None:
            return
        for t_param, s_param in zip(self.model.parameters(), self.student.parameters()):
            t_param.lerp_(s_param.detach().to(t_param.dtype), self.ema_rate)

    def state_dict(self) -> dict:
        return {"teacher": self.model.state_dict()} if self.model is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "teacher" in state:
            if self.model is not None:
                self.model.load_state_dict(state["teacher"])
            else:
                self.pending_state = state["teacher"]


def left_padded(tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(texts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(texts), width)
    for k, e in enumerate(encoded):
        if e:
            ids[k, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[k, width - len(e):] = 1.0
    return ids, mask


def teacher_extras(batch: Rollouts, device) -> tuple[Tensor, Tensor, Tensor] | None:
    if "teacher_logp" not in batch.extras:
        return None
    return (batch.extras["teacher_logp"].to(device), batch.extras["teacher_entropy"].to(device),
            batch.extras["distill_mask"].to(device))


class _Distilled:
    def needs_reference(self) -> bool:
        return self.teacher.kind == "reference"

    def after_step(self, metrics: dict) -> None:
        self.teacher.ema_update()

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state)


class SdpoObjective(_Distilled):
    """SDPO (Self-Distillation Policy Optimization), objectives.md §4.1 (TRL experimental SDPO).

    Distilled rows (a successful sibling exists; not the row itself when ``exclude_self``): per token
    l_t = sg(logp_s - logp_T) * logp_s * sg(min(pi_s/pi_old, is_clip)) (``loss_mode="sampled_token"``; reverse KL).
    Total: (1 - distill_weight) * PPO-clip(A) + distill_weight * distillation, default distill_weight = 1.
    Teacher: ``ema`` copy of the policy updated by ``ema_rate`` after every step (default), ``current`` policy,
    or the ``reference`` model; conditioned on :data:`DEFAULT_REPROMPT` (our wording). Aggregation: per-sequence
    token mean, then mean over sequences -> recipe ``aggregate: seq-mean-token-mean`` (undistilled rows count
    as sequences with loss 0).
    ``full_logits`` / ``topk_logits`` modes need the student's and teacher's full distributions, which
    PolicyOutputs does not carry; they are not available.
    Without ``prepare`` (no teacher extras) no row is distilled: the loss is (1 - distill_weight) * PPO-clip.
    Shared-test tags: T-ONPOL and T-ZEROADV (distillation does not follow batch.advantages; with the shared
    fixture there is no teacher, so the default loss is identically zero).
    """

    def __init__(self, *, distill_weight: float = 1.0, loss_mode: str = "sampled_token", teacher: str = "ema",
                 ema_rate: float = 0.05, success_threshold: float = 1.0, exclude_self: bool = True, is_clip: float = 2.0,
                 eps_low: float = 0.2, eps_high: float = 0.2, reprompt_template: str = DEFAULT_REPROMPT):
        if loss_mode != "sampled_token":
            raise ValueError(f"sdpo: loss_mode {loss_mode!r} needs full vocabulary distributions, which the training forward "
                             "does not return; only 'sampled_token' is available")
        if not 0 <= distill_weight <= 1:
            raise ValueError(f"sdpo: distill_weight must be in [0, 1], got {distill_weight}")
        self.distill_weight, self.is_clip, self.eps_low, self.eps_high = distill_weight, is_clip, eps_low, eps_high
        self.teacher = SelfDistillationTeacher(teacher=teacher, ema_rate=ema_rate, success_threshold=success_threshold,
                                               exclude_self=exclude_self, template=reprompt_template)

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        candidates = rollouts.completion_mask.sum(-1) > 0
        return self.teacher.fill(rollouts, ctx, candidates)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        loss = 0.0 * out.logp  # keeps the graph when no row is distilled
        metrics: dict = {}
        if self.distill_weight < 1:
            policy_loss, metrics = ppo_clip_loss(out, batch, eps_low=self.eps_low, eps_high=self.eps_high)
            loss = loss + (1 - self.distill_weight) * policy_loss
        teacher = teacher_extras(batch, out.logp.device)
        distilled = torch.zeros(batch.batch_size, dtype=torch.bool, device=out.logp.device)
        if teacher is not None:
            teacher_logp, _, distilled = teacher
            distill = sdpo_token_losses(out.logp, teacher_logp, old_logp_of(out, batch).to(out.logp.device), self.is_clip)
            loss = loss + self.distill_weight * distill * distilled[:, None]
            gap = (out.logp.detach() - teacher_logp)
            metrics["sdpo/student_minus_teacher"] = masked_mean(gap, mask * distilled[:, None])
        metrics["sdpo/distilled_frac"] = distilled.float().mean() if distilled.numel() else torch.tensor(0.0)
        return loss * mask, metrics


register("objective", "sdpo", spec="objectives.md §4.1", tags=("skip:T-ONPOL", "skip:T-ZEROADV"))(SdpoObjective)


ROUTE_GRPO, ROUTE_DISTILL, ROUTE_DROP = 0, 1, 2


class SrpoObjective(_Distilled):
    """SRPO (Sample-Routed Policy Optimization), objectives.md §4.2 (routing exact from the abstract; weight
    form and defaults reconstructed, exposed as options).

    Correct rows (reward >= success_threshold) -> PPO-clip with the recipe's GRPO advantage (computed over the full
    group); failed rows with a teacher context -> SDPO sampled-token loss (§4.1) times the teacher-confidence
    weight w = exp(-H^T/entropy_temperature), normalised to mean 1 over distilled tokens; failed rows without a
    successful sibling -> ``no_teacher`` = "grpo" (default) or "drop".
    L = token-mean_{C + fallback}(PPO) + distill_coef * token-mean_F(w * l_SDPO): ``prepare`` stores per-row scales
    n_all/n_route (for the recipe's aggregate) so one aggregation over the batch gives that sum exactly.
    Without ``prepare`` (no teacher) every row routes to GRPO: SRPO == PPO-clip, so the shared tests apply.
    """

    def __init__(self, *, success_threshold: float = 1.0, distill_coef: float = 1.0, entropy_temperature: float = 1.0,
                 no_teacher: str = "grpo", teacher: str = "ema", ema_rate: float = 0.05, is_clip: float = 2.0,
                 eps_low: float = 0.2, eps_high: float = 0.28, reprompt_template: str = DEFAULT_REPROMPT):
        if no_teacher not in ("grpo", "drop"):
            raise ValueError(f"srpo: no_teacher must be 'grpo' or 'drop', got {no_teacher!r}")
        if entropy_temperature <= 0:
            raise ValueError(f"srpo: entropy_temperature must be > 0, got {entropy_temperature}")
        self.success_threshold, self.distill_coef, self.entropy_temperature = success_threshold, distill_coef, entropy_temperature
        self.no_teacher, self.is_clip, self.eps_low, self.eps_high = no_teacher, is_clip, eps_low, eps_high
        self.teacher = SelfDistillationTeacher(teacher=teacher, ema_rate=ema_rate, success_threshold=success_threshold,
                                               exclude_self=True, template=reprompt_template)

    def routes(self, rollouts: Rollouts, has_teacher: Tensor) -> Tensor:
        """[B] 0 = GRPO, 1 = distill, 2 = dropped."""
        r = rollouts.rewards.float()
        failed = torch.nan_to_num(r, nan=float("inf")) < self.success_threshold
        route = torch.full((rollouts.batch_size,), ROUTE_GRPO, dtype=torch.long)
        route[failed & has_teacher] = ROUTE_DISTILL
        if self.no_teacher == "drop":
            route[failed & ~has_teacher] = ROUTE_DROP
        return route

    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        if rollouts.rewards is None:
            raise ValueError("srpo needs rollouts.rewards to route samples")
        r = rollouts.rewards.float()
        failed = torch.nan_to_num(r, nan=float("inf")) < self.success_threshold
        rollouts = self.teacher.fill(rollouts, ctx, failed & (rollouts.completion_mask.sum(-1) > 0))
        route = self.routes(rollouts, rollouts.extras["distill_mask"])
        mask = rollouts.completion_mask
        distill_tokens = mask * (route == ROUTE_DISTILL)[:, None]
        rollouts.extras["srpo_weight"] = entropy_weights(rollouts.extras["teacher_entropy"], distill_tokens,
                                                         self.entropy_temperature)
        rollouts.extras["srpo_route"] = route
        rollouts.extras["srpo_scale"] = part_scales(ctx, mask, [route == ROUTE_GRPO, route == ROUTE_DISTILL])
        return rollouts

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        mask = batch.completion_mask
        device = out.logp.device
        ppo, metrics = ppo_clip_loss(out, batch, eps_low=self.eps_low, eps_high=self.eps_high)
        route = batch.extras.get("srpo_route")
        if route is None:  # no prepare: nobody has a teacher
            return ppo, {**metrics, "srpo/grpo_frac": torch.tensor(1.0), "srpo/distill_frac": torch.tensor(0.0)}
        route = route.to(device)
        scale = batch.extras["srpo_scale"].to(device)[:, None]
        teacher_logp = batch.extras["teacher_logp"].to(device)
        weight = batch.extras["srpo_weight"].to(device)
        distill = sdpo_token_losses(out.logp, teacher_logp, old_logp_of(out, batch).to(device), self.is_clip)
        loss = torch.where((route == ROUTE_GRPO)[:, None], ppo, torch.zeros_like(ppo))
        loss = loss + torch.where((route == ROUTE_DISTILL)[:, None], self.distill_coef * weight * distill, torch.zeros_like(ppo))
        d_tok = mask * (route == ROUTE_DISTILL)[:, None]
        metrics.update({
            "srpo/grpo_frac": (route == ROUTE_GRPO).float().mean(),
            "srpo/distill_frac": (route == ROUTE_DISTILL).float().mean(),
            "srpo/dropped_frac": (route == ROUTE_DROP).float().mean(),
            "srpo/teacher_entropy": masked_mean(batch.extras["teacher_entropy"].to(device), d_tok),
            "srpo/distill_loss": masked_mean(distill.detach(), d_tok),
        })
        return loss * scale * mask, metrics


register("objective", "srpo", spec="objectives.md §4.2")(SrpoObjective)
