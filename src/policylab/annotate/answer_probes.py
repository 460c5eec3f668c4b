"""Answer probes at reasoning-step boundaries: SPAE (arXiv:2601.03823) and GRPO-VPS (arXiv:2604.20659).

Both append an answer template plus the gold answer after each step of a rollout, read the policy's
teacher-forced probability of the answer (``ctx.score`` on the probe pairs, token_batches.py), and reshape
the rollout's outcome advantage token by token. ``annotate`` runs the probes and returns per-row fields;
``__call__`` is the pure tensor math of policylab/algo/advantages/probe_credit.py on those fields.
Probe log-probs are at the training forward's temperature (``ctx.temperature``, the rollout temperature).
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages.base_advantage import BaseAdvantage
from policylab.algo.advantages.probe_credit import (
    NO_SEGMENT,
    answer_probability,
    probed_segments,
    segment_ends,
    spae_metrics,
    spae_potential,
    spae_token_advantages,
    stop_position,
    vps_metrics,
    vps_token_advantages,
)
from policylab.algo.group_stats import correctness, zero_failed
from policylab.annotate.continuations import sample_mean_entropies
from policylab.annotate.token_batches import completion_tokens, encode, pad_id_of, prompt_tokens, score_pairs, token_texts
from policylab.fields import declare_field
from policylab.registry import register
from policylab.rollouts import Rollouts

SPAE_SEGMENT = declare_field("spae_segment", per_row=True, shape="[B,T]", dtype="long", owner="advantage 'spae'",
                             doc="0-based reasoning step of each completion token; -1 after the stop marker")
SPAE_POTENTIAL = declare_field("spae_potential", per_row=True, shape="[B,K]", dtype="float", owner="advantage 'spae'",
                               doc="step potential Φ_k of each probed step (NaN past the row's steps)")
SPAE_NUM_STEPS = declare_field("spae_num_steps", per_row=True, shape="[B]", dtype="long", owner="advantage 'spae'",
                               doc="number of probed steps of the row (0: the row keeps its outcome advantage)")
VPS_SEGMENT = declare_field("vps_segment", per_row=True, shape="[B,T]", dtype="long", owner="advantage 'grpo_vps'",
                            doc="0-based segment of each completion token; -1 where no segment was probed")
VPS_ANSWER_PROB = declare_field("vps_answer_prob", per_row=True, shape="[B,K]", dtype="float",
                                owner="advantage 'grpo_vps'",
                                doc="p_0..p_K: probed gold-answer probability after the prompt and after each segment "
                                    "(NaN past the row's probes)")


class _AnswerProbe:
    """Shared probe plumbing: step boundaries, answer ids, the probe contexts of a batch."""

    delimiter: str
    stop_marker: str | None
    template: str
    answer_field: str
    max_segments: int | None
    metrics: dict[str, float]

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)

    def _steps(self, rollouts: Rollouts, tokenizer, i: int) -> tuple[list[int], list[int], int | None]:
        ids = completion_tokens(rollouts, i)
        pieces = token_texts(tokenizer, ids)
        ends = segment_ends(pieces, self.delimiter, stop_marker=self.stop_marker, max_segments=self.max_segments)
        return ids, ends, stop_position(pieces, self.stop_marker)

    def _answer_ids(self, tokenizer, row: dict) -> list[int] | None:
        answer = row.get(self.answer_field)
        if answer is None or str(answer) == "":
            return None
        return encode(tokenizer, str(answer))

    @staticmethod
    def _tokenizer(ctx, who: str):
        if ctx is None or getattr(ctx, "tokenizer", None) is None:
            raise ValueError(f"{who} needs ctx.tokenizer (and ctx.score) in annotate()")
        return ctx.tokenizer

    def _probes(self, rollouts: Rollouts, tokenizer, with_prompt_probe: bool):
        """(segment [B,T], contexts, answers, owner row of each probe). A row without a step or an answer
        gets no probe and NO_SEGMENT everywhere."""
        template_ids = encode(tokenizer, self.template)
        b, width = rollouts.completion_ids.shape
        segment = torch.full((b, width), NO_SEGMENT, dtype=torch.long)
        contexts, answers, owners = [], [], []
        for i in range(b):
            ids, ends, stop = self._steps(rollouts, tokenizer, i)
            answer_ids = self._answer_ids(tokenizer, rollouts.rows[i] if rollouts.rows else {})
            if not ends or not answer_ids:
                continue
            segment[i] = probed_segments(ends, stop, width)
            prefix = prompt_tokens(rollouts, i)
            for end in ([-1] if with_prompt_probe else []) + ends:  # -1: the probe right after the prompt
                contexts.append(prefix + ids[: end + 1] + template_ids)
                answers.append(answer_ids)
                owners.append(i)
        return segment, contexts, answers, owners


@register("advantage", "spae", spec="arXiv:2601.03823 (potential Φ exact from the released probe; advantage reconstructed)")
class SPAEAdvantage(_AnswerProbe):
    """SPAE (Step Potential Advantage Estimation, arXiv:2601.03823): a step potential from answer probes
    shapes the outcome advantage per token.

    At each step boundary k (".\\n\\n" before "</think>") the probe string and the gold answer are
    appended: Acc_k = mean teacher-forced probability of the answer tokens, Conf_k = mean over
    ``num_probe_samples`` short continuations (``probe_max_tokens``, temperature ``probe_temperature``) of
    exp(−mean token entropy); Φ_k = 1.5·Acc_k·Conf_k + 0.5·Acc_k − Conf_k. Token t of step k gets
    A_i + α·(Φ_k − Φ_{k−1}) − ρ·|A_i|·[k after the first step with Φ > threshold]; tokens after "</think>"
    keep A_i. ``confidence="teacher_forced"`` (ours, cheaper) uses exp(−mean entropy) over the answer
    positions of the Acc pass instead of sampling. Reconstructed: the combination and α = 1, ρ = 0.5.
    """

    provides = ("spae_segment", "spae_potential", "spae_num_steps")

    def __init__(self, alpha: float = 1.0, rho: float = 0.5, threshold: float = 0.9, delimiter: str = ".\n\n",
                 stop_marker: str | None = "</think>", template: str = "**Final Answer**\n\\boxed{",
                 answer_field: str = "answer", num_probe_samples: int = 5, probe_temperature: float = 0.6,
                 probe_max_tokens: int = 10, confidence: str = "sampled", max_segments: int | None = 32,
                 probe_batch_size: int = 16, seed: int = 0, base: str = "grpo", base_params: dict | None = None):
        if confidence not in ("sampled", "teacher_forced"):
            raise ValueError(f"spae confidence must be 'sampled' or 'teacher_forced', got {confidence!r}")
        self.alpha, self.rho, self.threshold = alpha, rho, threshold
        self.delimiter, self.stop_marker, self.template, self.answer_field = delimiter, stop_marker, template, answer_field
        self.num_probe_samples, self.probe_temperature, self.probe_max_tokens = num_probe_samples, probe_temperature, probe_max_tokens
        self.confidence, self.max_segments, self.probe_batch_size = confidence, max_segments, probe_batch_size
        self.base = BaseAdvantage(base, base_params)
        self.generator = torch.Generator().manual_seed(seed)
        self.metrics: dict[str, float] = {}

    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("rewards", "rows", *self.base.requires, *self.provides)))

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        tokenizer = self._tokenizer(ctx, "spae")
        if self.confidence == "sampled" and getattr(ctx, "policy", None) is None:
            raise ValueError("spae confidence='sampled' needs ctx.policy in annotate() to sample probe continuations")
        pad = pad_id_of(tokenizer)
        segment, contexts, answers, owners = self._probes(rollouts, tokenizer, with_prompt_probe=False)
        b = rollouts.batch_size
        num_steps = torch.bincount(torch.tensor(owners, dtype=torch.long), minlength=b) if owners else torch.zeros(b, dtype=torch.long)
        potentials = torch.full((b, max(1, int(num_steps.max()))), float("nan"))
        if contexts:
            scored = score_pairs(ctx, contexts, answers, pad)
            acc = torch.stack([s["logp"].exp().mean() for s in scored])
            if self.confidence == "sampled":
                mean_h = sample_mean_entropies(
                    ctx.policy, contexts, num_samples=self.num_probe_samples, max_new_tokens=self.probe_max_tokens,
                    temperature=self.probe_temperature, eos_id=getattr(tokenizer, "eos_token_id", None), pad_id=pad,
                    generator=self.generator, chunk=self.probe_batch_size)
                conf = torch.exp(-mean_h).mean(-1)
            else:
                conf = torch.stack([torch.exp(-s["entropy"].mean()) for s in scored])
            phi = spae_potential(acc, conf)
            slot = [0] * b
            for j, i in enumerate(owners):
                potentials[i, slot[i]] = phi[j]
                slot[i] += 1
        return {"spae_segment": segment, "spae_potential": potentials, "spae_num_steps": num_steps}

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        adv = self.base.sequence(rollouts, "spae")
        if "spae_segment" not in rollouts.extras:
            raise ValueError("spae: rollouts.extras has no probe results; its annotate(rollouts, ctx) must run first")
        segment, potentials, steps = (rollouts.extras[k] for k in self.provides)
        out = spae_token_advantages(adv, segment, potentials, steps, alpha=self.alpha, rho=self.rho, threshold=self.threshold)
        self.metrics = spae_metrics(correctness(rollouts), segment, potentials, steps, rollouts.completion_mask,
                                    self.threshold)
        return zero_failed(out, rollouts) * rollouts.completion_mask

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.base.load_state_dict(state.get("base", {}))


@register("advantage", "grpo_vps", spec="arXiv:2604.20659 (reconstructed from the abstract)")
class GRPOVPSAdvantage(_AnswerProbe):
    """GRPO-VPS (arXiv:2604.20659): the per-segment change of the probed gold-answer probability refines the
    GRPO advantage.

    p_k = exp(mean log π(y* | q, o_{≤b_k}, template)), k = 0..K (k = 0 probes right after the prompt);
    Δ_k = p_k − p_{k−1} standardised over all segments of the group; token t of segment k gets
    A_i + β·Δ̂_k; tokens after the last boundary keep A_i. Reconstructed from the abstract: β = 0.5,
    delimiter "\\n\\n", at most 32 segments (extra boundaries are thinned evenly) are our defaults. The
    probe uses the current policy (= π_old of this batch).
    """

    provides = ("vps_segment", "vps_answer_prob")

    def __init__(self, beta: float = 0.5, eps: float = 1e-6, delimiter: str = "\n\n", stop_marker: str | None = "</think>",
                 template: str = "\n**Final Answer**\n\\boxed{", answer_field: str = "answer", max_segments: int | None = 32,
                 base: str = "grpo", base_params: dict | None = None):
        self.beta, self.eps = beta, eps
        self.delimiter, self.stop_marker, self.template, self.answer_field = delimiter, stop_marker, template, answer_field
        self.max_segments = max_segments
        self.base = BaseAdvantage(base, base_params)
        self.metrics: dict[str, float] = {}

    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("rewards", "rows", *self.base.requires, *self.provides)))

    @torch.no_grad()
    def annotate(self, rollouts: Rollouts, ctx) -> dict:
        tokenizer = self._tokenizer(ctx, "grpo_vps")
        segment, contexts, answers, owners = self._probes(rollouts, tokenizer, with_prompt_probe=True)
        b = rollouts.batch_size
        k_max = max([owners.count(i) for i in set(owners)], default=1)
        probs = torch.full((b, k_max), float("nan"))
        slot = [0] * b
        for j, s in enumerate(score_pairs(ctx, contexts, answers, pad_id_of(tokenizer))):
            i = owners[j]
            probs[i, slot[i]] = answer_probability(s["logp"])
            slot[i] += 1
        return {"vps_segment": segment, "vps_answer_prob": probs}

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        adv = self.base.sequence(rollouts, "grpo_vps")
        if "vps_segment" not in rollouts.extras:
            raise ValueError("grpo_vps: rollouts.extras has no probe results; its annotate(rollouts, ctx) must run first")
        segment, table = rollouts.extras["vps_segment"], rollouts.extras["vps_answer_prob"]
        probs = [row[~torch.isnan(row)] for row in table.float()]
        out = vps_token_advantages(adv, rollouts.group, probs, segment, beta=self.beta, eps=self.eps)
        self.metrics = vps_metrics(correctness(rollouts), probs)
        return zero_failed(out, rollouts) * rollouts.completion_mask

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state.get("base", {}))
