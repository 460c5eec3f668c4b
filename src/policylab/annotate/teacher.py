"""The self-distillation teacher of SDPO (arXiv:2601.20802) and SRPO (arXiv:2604.02288), and their registered
objectives.

The teacher is the same network (an EMA copy of the policy by default, or the current policy, or the frozen
reference) conditioned on a *reprompt*: the original prompt plus a successful rollout of the same prompt. Once
per rollout batch it scores the student's own completion tokens under that reprompt (``ctx.score`` on a Rollouts
whose prompts are the reprompts); the losses are in :mod:`policylab.algo.objectives.distillation`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from policylab.algo.objectives.distillation import SdpoLoss, SrpoLoss, failed_rows, teacher_demonstrations
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

# Our wording; the spec names the parts: prompt, a successful rollout, (feedback), "Correctly solve the original question."
DEFAULT_REPROMPT = "{prompt}\n\nHere is a correct solution to this problem:\n{solution}\n\nCorrectly solve the original question."
TEACHERS = ("ema", "current", "reference")

TEACHER_LOGP = declare_field("teacher_logp", per_row=True, shape="[B,T]", dtype="float", owner="objectives 'sdpo', 'srpo'",
                             doc="log-prob of each completion token under the self-distillation teacher and its "
                                 "reprompt; 0 on rows without a teacher")
TEACHER_ENTROPY = declare_field("teacher_entropy", per_row=True, shape="[B,T]", dtype="float", owner="objective 'srpo'",
                                doc="teacher's token entropy under the reprompt; 0 on rows without a teacher")
DISTILL_MASK = declare_field("distill_mask", per_row=True, shape="[B]", dtype="bool", owner="objective 'sdpo'",
                             doc="rows that got a teacher context (a successful sibling) and are distilled")
SRPO_ROUTE = declare_field("srpo_route", per_row=True, shape="[B]", dtype="long", owner="objective 'srpo'",
                           doc="SRPO route per row: 0 = GRPO, 1 = self-distillation, 2 = dropped")
SRPO_WEIGHT = declare_field("srpo_weight", per_row=True, shape="[B,T]", dtype="float", owner="objective 'srpo'",
                            doc="teacher-confidence weight exp(-H^T/tau) on distilled tokens, mean 1 over them")
SRPO_SCALE = declare_field("srpo_scale", per_row=True, shape="[B]", dtype="float", owner="objective 'srpo'",
                           doc="n_all/n_route token counts: one token-mean over the batch = sum of the routes' token-means")


def reprompt_text(formatted_prompt: str, original_prompt: str, solution: str, template: str = DEFAULT_REPROMPT) -> str:
    """The teacher's prompt: ``template`` filled in, put where the original prompt sat in the formatted prompt
    (so a chat template / system prompt the engine applied is kept)."""
    content = template.format(prompt=original_prompt, solution=solution)
    if original_prompt and original_prompt in formatted_prompt:
        return formatted_prompt.replace(original_prompt, content, 1)
    return content


def left_padded(tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
    """Prompt ids [N,P] and mask, left padded (the Rollouts prompt layout), tokenised without special tokens."""
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
            return ctx.policy
        if self.kind == "reference":
            if ctx.reference is None:
                raise ValueError("teacher='reference' needs the reference model (ctx.reference)")
            return ctx.reference
        if self.model is None:
            self.model = copy.deepcopy(ctx.policy).eval().requires_grad_(False)
            if self.pending_state is not None:
                self.model.load_state_dict(self.pending_state)
                self.pending_state = None
        self.student = ctx.policy
        return self.model

    @torch.no_grad()
    def score(self, rollouts: Rollouts, ctx, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(teacher_logp [B,T], teacher_entropy [B,T], has_teacher [B]) for the candidate rows with a successful
        sibling; zeros elsewhere."""
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
            teacher_entropy[rows] = scored.entropy.float()
        return teacher_logp, teacher_entropy, demo >= 0

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


class _Distilled:
    """Teacher plumbing shared by SDPO and SRPO: the EMA update after each optimizer step, checkpoints."""

    requires = ("rewards",)
    teacher: SelfDistillationTeacher

    def after_step(self, metrics: dict) -> None:
        self.teacher.ema_update()

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state)


class SdpoObjective(_Distilled, SdpoLoss):
    """SDPO (Self-Distillation Policy Optimization; Hubotter et al. 2026, arXiv:2601.20802; TRL experimental SDPO).

    In words: the policy distils from itself conditioned on a successful sibling rollout. Rows with a successful
    sibling (not the row itself when ``exclude_self``) are scored by the teacher under the reprompt
    :data:`DEFAULT_REPROMPT` (our wording), and each sampled token is pulled toward the teacher's log-prob:
    l_t = sg(logp_s - logp_T) * logp_s * sg(min(pi_s/pi_old, is_clip)) (reverse KL; the loss: :class:`SdpoLoss`).
    Teacher: ``ema`` copy of the policy updated by ``ema_rate`` after every step (default), ``current`` policy,
    or the ``reference`` model. Aggregation: per-sequence token mean, then mean over sequences (recipe
    ``aggregate: seq-mean-token-mean``; undistilled rows count as sequences with loss 0).
    ``annotate`` (once per rollout batch): the teacher pass, fields ``teacher_logp`` and ``distill_mask``.
    Shared-test tags: T-ONPOL and T-ZEROADV (distillation does not follow batch.advantages; with the shared
    fixture there is no teacher, so the default loss is identically zero).
    """

    provides = (TEACHER_LOGP, DISTILL_MASK)

    def __init__(self, *, distill_weight: float = 1.0, loss_mode: str = "sampled_token", teacher: str = "ema",
                 ema_rate: float = 0.05, success_threshold: float = 1.0, exclude_self: bool = True, is_clip: float = 2.0,
                 eps_low: float = 0.2, eps_high: float = 0.2, reprompt_template: str = DEFAULT_REPROMPT):
        SdpoLoss.__init__(self, distill_weight=distill_weight, loss_mode=loss_mode, is_clip=is_clip, eps_low=eps_low,
                          eps_high=eps_high)
        self.teacher = SelfDistillationTeacher(teacher=teacher, ema_rate=ema_rate, success_threshold=success_threshold,
                                               exclude_self=exclude_self, template=reprompt_template)
        self.needs_reference_model = teacher == "reference"

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        candidates = rollouts.completion_mask.sum(-1) > 0
        teacher_logp, _, has_teacher = self.teacher.score(rollouts, ctx, candidates)
        return {"teacher_logp": teacher_logp, "distill_mask": has_teacher}


register("objective", "sdpo", spec="arXiv:2601.20802 (SDPO, sampled-token self-distillation)",
         tags=("skip:T-ONPOL", "skip:T-ZEROADV"))(SdpoObjective)


class SrpoObjective(_Distilled, SrpoLoss):
    """SRPO (Sample-Routed Policy Optimization; Li et al. 2026, arXiv:2604.02288; routing exact from the abstract,
    weight form and defaults reconstructed, exposed as options).

    In words: correct rows (reward >= success_threshold) get PPO-clip with the recipe's GRPO advantage (computed over
    the full group); failed rows with a successful sibling get SDPO's sampled-token loss times the teacher-confidence
    weight exp(-H^T/entropy_temperature); each route is a token-mean over its own tokens (the loss: :class:`SrpoLoss`).
    ``annotate`` (once per rollout batch): the teacher pass over the failed rows (``teacher_logp``,
    ``teacher_entropy``), then the routes, weights and route scales (``srpo_route``, ``srpo_weight``, ``srpo_scale``).
    """

    provides = (TEACHER_LOGP, TEACHER_ENTROPY, SRPO_ROUTE, SRPO_WEIGHT, SRPO_SCALE)

    def __init__(self, *, success_threshold: float = 1.0, distill_coef: float = 1.0, entropy_temperature: float = 1.0,
                 no_teacher: str = "grpo", teacher: str = "ema", ema_rate: float = 0.05, is_clip: float = 2.0,
                 eps_low: float = 0.2, eps_high: float = 0.28, reprompt_template: str = DEFAULT_REPROMPT):
        SrpoLoss.__init__(self, success_threshold=success_threshold, distill_coef=distill_coef,
                          entropy_temperature=entropy_temperature, no_teacher=no_teacher, is_clip=is_clip,
                          eps_low=eps_low, eps_high=eps_high)
        self.teacher = SelfDistillationTeacher(teacher=teacher, ema_rate=ema_rate, success_threshold=success_threshold,
                                               exclude_self=True, template=reprompt_template)
        self.needs_reference_model = teacher == "reference"

    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        candidates = failed_rows(rollouts.rewards, self.success_threshold) & (rollouts.completion_mask.sum(-1) > 0)
        teacher_logp, teacher_entropy, has_teacher = self.teacher.score(rollouts, ctx, candidates)
        return {"teacher_logp": teacher_logp, "teacher_entropy": teacher_entropy,
                **self.route_fields(rollouts, teacher_entropy, has_teacher)}


register("objective", "srpo", spec="arXiv:2604.02288 (SRPO, sample routing GRPO / self-distillation)")(SrpoObjective)
