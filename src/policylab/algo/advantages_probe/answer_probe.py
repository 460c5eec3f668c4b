"""Answer probes at reasoning-step boundaries: SPAE (advantages_rewards.md B12) and GRPO-VPS (B13).

Both append an answer template plus the gold answer after each step of a rollout, read the policy's
teacher-forced probability of the answer, and reshape the rollout's outcome advantage token by token.
``prepare`` runs the probe passes (it needs ``ctx.model`` and ``ctx.tokenizer``) and stores per-row
results in ``rollouts.extras``; ``__call__`` is pure tensor math on those extras.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.algo.advantages_probe.common import (
    BaseAdvantage,
    completion_tokens,
    correctness,
    encode,
    pad_id_of,
    prompt_tokens,
    sample_mean_entropies,
    score_in_chunks,
    segment_ends,
    segment_of_tokens,
    stop_position,
    token_texts,
    zero_failed,
)
from policylab.algo.group_stats import group_index
from policylab.registry import register
from policylab.rollouts import Rollouts

NO_SEGMENT = -1  # token outside every probed step (after the stop marker): keeps the outcome advantage


# -- SPAE (B12) -----------------------------------------------------------------------------------------


def spae_potential(acc: Tensor, conf: Tensor) -> Tensor:
    """Φ = 1.5·Acc·Conf + 0.5·Acc − Conf ∈ [−1, 1] (B12, exact from the released probe)."""
    return 1.5 * acc * conf + 0.5 * acc - conf


def spae_step_terms(potentials: Tensor, threshold: float = 0.9) -> tuple[Tensor, int | None]:
    """ΔΦ_k = Φ_k − Φ_{k−1} with ΔΦ_1 = 0, and the saturation step k* = first k with Φ_k > threshold (0-based)."""
    delta = torch.zeros_like(potentials)
    if potentials.numel() > 1:
        delta[1:] = potentials[1:] - potentials[:-1]
    above = (potentials > threshold).nonzero()
    return delta, (int(above[0]) if above.numel() else None)


def spae_token_advantages(adv: Tensor, segment: Tensor, potentials: Tensor, num_steps: Tensor, *,
                          alpha: float = 1.0, rho: float = 0.5, threshold: float = 0.9) -> Tensor:
    """A[i,t] = A_i + α·ΔΦ_{k(t)} − ρ·|A_i|·1[k(t) > k*] (B12, reconstructed combination).

    ``segment`` [B,T]: 0-based step of each token; ``num_steps[i]`` for tokens after the last probed
    step but before the stop marker (ΔΦ = 0 there, still penalised past k*); NO_SEGMENT (after
    "</think>") keeps A_i. ``potentials`` [B,K] (NaN past num_steps). No step → A_i everywhere.
    """
    out = adv[:, None].expand(segment.shape).clone().float()
    for i in range(adv.shape[0]):
        k_i = int(num_steps[i])
        if k_i == 0:
            continue
        delta, k_star = spae_step_terms(potentials[i, :k_i].float(), threshold)
        delta = torch.cat([delta, delta.new_zeros(1)])  # the tail after the last probed step
        over = torch.zeros(k_i + 1, dtype=torch.bool)
        if k_star is not None:
            over[k_star + 1 :] = True
        seg = segment[i]
        inside = seg != NO_SEGMENT
        s = seg.clamp(min=0, max=k_i)
        shaped = adv[i] + alpha * delta[s] - rho * adv[i].abs() * over[s].float()
        out[i] = torch.where(inside, shaped, out[i])
    return out


class _AnswerProbe:
    """Shared probe plumbing: step boundaries, contexts, teacher-forced answer log-probs."""

    metrics: dict[str, float]

    def after_step(self, metrics: dict) -> None:
        metrics.update(self.metrics)

    delimiter: str
    stop_marker: str | None
    template: str
    answer_field: str
    max_segments: int | None
    probe_batch_size: int

    def _steps(self, rollouts: Rollouts, tokenizer, i: int) -> tuple[list[int], list[int], int | None]:
        ids = completion_tokens(rollouts, i)
        pieces = token_texts(tokenizer, ids)
        ends = segment_ends(pieces, self.delimiter, stop_marker=self.stop_marker, max_segments=self.max_segments)
        return ids, ends, stop_position(pieces, self.stop_marker)

    def _segment_row(self, ends: list[int], stop: int | None, width: int) -> Tensor:
        seg = segment_of_tokens(ends, width)
        if stop is not None:
            seg[stop:] = NO_SEGMENT
        return seg

    @staticmethod
    def _ctx_parts(ctx):
        if ctx is None or getattr(ctx, "model", None) is None or getattr(ctx, "tokenizer", None) is None:
            raise ValueError("answer probes need ctx.model and ctx.tokenizer in prepare()")
        return ctx.model, ctx.tokenizer

    def _answer_ids(self, tokenizer, row: dict) -> list[int] | None:
        answer = row.get(self.answer_field)
        if answer is None or str(answer) == "":
            return None
        return encode(tokenizer, str(answer))


@register("advantage", "spae", spec="advantages_rewards.md B12")
class SPAEAdvantage(_AnswerProbe):
    """SPAE: step potential Φ = 1.5·Acc·Conf + 0.5·Acc − Conf from answer probes; shaped token advantages.

    Acc_k = mean teacher-forced probability of the gold answer tokens after the probe string;
    Conf_k = mean over ``num_probe_samples`` short continuations (``probe_max_tokens``, temperature
    ``probe_temperature``) of exp(−mean token entropy). ``confidence="teacher_forced"`` (ours, cheaper)
    uses exp(−mean entropy) over the answer positions of the Acc pass instead of sampling.
    Reconstructed: the advantage combination and α, ρ (spec defaults 1.0, 0.5); steps end with ".\\n\\n".
    """

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

    @torch.no_grad()
    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        model, tokenizer = self._ctx_parts(ctx)
        pad = pad_id_of(tokenizer)
        template_ids = encode(tokenizer, self.template)
        b, width = rollouts.completion_ids.shape
        segment = torch.full((b, width), NO_SEGMENT, dtype=torch.long)
        num_steps = torch.zeros(b, dtype=torch.long)
        contexts, answers, owners = [], [], []
        for i in range(b):
            ids, ends, stop = self._steps(rollouts, tokenizer, i)
            answer_ids = self._answer_ids(tokenizer, rollouts.rows[i] if rollouts.rows else {})
            if not ends or not answer_ids:
                segment[i] = NO_SEGMENT  # nothing probed: every token keeps A_i
                continue
            segment[i] = self._segment_row(ends, stop, width)
            num_steps[i] = len(ends)
            prefix = prompt_tokens(rollouts, i)
            for end in ends:
                contexts.append(prefix + ids[: end + 1] + template_ids)
                answers.append(answer_ids)
                owners.append(i)
        potentials = torch.full((b, max(1, int(num_steps.max()))), float("nan"))
        if contexts:
            scored = score_in_chunks(model, contexts, answers, pad, chunk=self.probe_batch_size)
            acc = torch.stack([s["logp"].exp().mean() for s in scored])
            if self.confidence == "sampled":
                mean_h = sample_mean_entropies(
                    model, contexts, num_samples=self.num_probe_samples, max_new_tokens=self.probe_max_tokens,
                    temperature=self.probe_temperature, eos_id=getattr(tokenizer, "eos_token_id", None), pad_id=pad,
                    generator=self.generator, chunk=self.probe_batch_size)
                conf = torch.exp(-mean_h).mean(-1)
            else:
                conf = torch.stack([torch.exp(-s["entropy"].mean()) for s in scored])
            phi = spae_potential(acc, conf)
            slot = torch.zeros(b, dtype=torch.long)
            for j, i in enumerate(owners):
                potentials[i, slot[i]] = phi[j]
                slot[i] += 1
        extras = dict(rollouts.extras, spae_segment=segment, spae_potential=potentials, spae_num_steps=num_steps)
        return rollouts.with_(extras=extras)

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        adv = self.base(rollouts)
        if adv.dim() != 1:
            raise ValueError("spae shapes a sequence-level base advantage; the base returned [B,T]")
        if "spae_segment" not in rollouts.extras:
            raise ValueError("spae: rollouts.extras has no probe results; the loop must call prepare(rollouts, ctx) first")
        segment, potentials, steps = (rollouts.extras[k] for k in ("spae_segment", "spae_potential", "spae_num_steps"))
        out = spae_token_advantages(adv, segment, potentials, steps, alpha=self.alpha, rho=self.rho, threshold=self.threshold)
        self.metrics = self._metrics(rollouts, segment, potentials, steps)
        return zero_failed(out, rollouts) * rollouts.completion_mask

    def _metrics(self, rollouts: Rollouts, segment: Tensor, potentials: Tensor, steps: Tensor) -> dict[str, float]:
        correct = correctness(rollouts)
        solving = checking = 0.0
        right_to_wrong, deltas = [], []
        for i in range(rollouts.batch_size):
            k = int(steps[i])
            if k == 0:
                continue
            delta, k_star = spae_step_terms(potentials[i, :k], self.threshold)
            deltas.append(delta)
            valid = (segment[i] != NO_SEGMENT) & (rollouts.completion_mask[i] > 0)
            if k_star is None:
                solving += float(valid.sum())
            else:
                solving += float((valid & (segment[i] <= k_star)).sum())
                checking += float((valid & (segment[i] > k_star)).sum())
            right_to_wrong.append(float(k_star is not None and correct[i] == 0))
        return {
            "spae/solving_tokens": solving,
            "spae/checking_tokens": checking,
            "spae/right_to_wrong": sum(right_to_wrong) / max(1, len(right_to_wrong)),
            "spae/mean_delta_phi": float(torch.cat(deltas).mean()) if deltas else 0.0,
        }

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.base.load_state_dict(state.get("base", {}))


# -- GRPO-VPS (B13) ---------------------------------------------------------------------------------------


def answer_probability(answer_logp: Tensor) -> Tensor:
    """p = exp(mean log π(y*_m | ...)) over the answer tokens only (B13)."""
    return answer_logp.mean().exp() if answer_logp.numel() else torch.tensor(float("nan"))


def vps_token_advantages(adv: Tensor, group: Tensor, probs: list[Tensor], segment: Tensor, *,
                         beta: float = 0.5, eps: float = 1e-6) -> Tensor:
    """A[i,t] = A_i + β·Δ̂_{k(t)} with Δ_k = p_k − p_{k−1}, Δ̂ standardised over all steps of the group (B13).

    ``probs[i]`` = [p_0..p_K] (p_0: answer probed right after the prompt); ``segment`` [B,T] is the
    0-based step of each token; tokens with segment ≥ K or NO_SEGMENT keep A_i. Std is unbiased; fewer
    than two steps in a group, or std 0, gives Δ̂ = 0.
    """
    out = adv[:, None].expand(segment.shape).clone().float()
    deltas = [p[1:] - p[:-1] if p.numel() > 1 else p.new_zeros(0) for p in probs]
    idx, k = group_index(group)
    for g in range(k):
        rows = (idx == g).nonzero().flatten().tolist()
        pooled = torch.cat([deltas[i] for i in rows]) if rows else torch.zeros(0)
        if pooled.numel() < 2:
            continue
        mean, std = pooled.mean(), pooled.std()
        for i in rows:
            d = deltas[i]
            if d.numel() == 0:
                continue
            d_hat = (d - mean) / (std + eps)
            seg = segment[i]
            inside = (seg >= 0) & (seg < d.numel())
            out[i] = torch.where(inside, adv[i] + beta * d_hat[seg.clamp(0, d.numel() - 1)], out[i])
    return out


@register("advantage", "grpo_vps", spec="advantages_rewards.md B13")
class GRPOVPSAdvantage(_AnswerProbe):
    """GRPO-VPS: per-step change of the probed gold-answer probability refines the GRPO advantage.

    p_k = exp(mean log π(y* | q, o_{≤b_k}, template)), k = 0..K (k = 0 probes right after the prompt);
    Δ_k = p_k − p_{k−1} standardised within the group; A[i,t] = A_i + β·Δ̂_{k(t)}; tokens after the
    last step keep A_i. Reconstructed from the abstract: β = 0.5, delimiter "\\n\\n", at most 32 steps
    (extra boundaries are thinned evenly) are our defaults. The probe uses the current policy = π_old.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-6, delimiter: str = "\n\n", stop_marker: str | None = "</think>",
                 template: str = "\n**Final Answer**\n\\boxed{", answer_field: str = "answer", max_segments: int | None = 32,
                 probe_batch_size: int = 16, base: str = "grpo", base_params: dict | None = None):
        self.beta, self.eps = beta, eps
        self.delimiter, self.stop_marker, self.template, self.answer_field = delimiter, stop_marker, template, answer_field
        self.max_segments, self.probe_batch_size = max_segments, probe_batch_size
        self.base = BaseAdvantage(base, base_params)
        self.metrics: dict[str, float] = {}

    @torch.no_grad()
    def prepare(self, rollouts: Rollouts, ctx) -> Rollouts:
        model, tokenizer = self._ctx_parts(ctx)
        pad = pad_id_of(tokenizer)
        template_ids = encode(tokenizer, self.template)
        b, width = rollouts.completion_ids.shape
        segment = torch.full((b, width), NO_SEGMENT, dtype=torch.long)
        contexts, answers, owners = [], [], []
        for i in range(b):
            ids, ends, stop = self._steps(rollouts, tokenizer, i)
            answer_ids = self._answer_ids(tokenizer, rollouts.rows[i] if rollouts.rows else {})
            if not ends or not answer_ids:
                continue
            segment[i] = self._segment_row(ends, stop, width)
            prefix = prompt_tokens(rollouts, i)
            for end in [-1, *ends]:  # -1: the probe right after the prompt (p_0)
                contexts.append(prefix + ids[: end + 1] + template_ids)
                answers.append(answer_ids)
                owners.append(i)
        k_max = max([owners.count(i) for i in set(owners)], default=1)
        probs = torch.full((b, k_max), float("nan"))
        if contexts:
            scored = score_in_chunks(model, contexts, answers, pad, chunk=self.probe_batch_size)
            slot = [0] * b
            for j, i in enumerate(owners):
                probs[i, slot[i]] = answer_probability(scored[j]["logp"])
                slot[i] += 1
        return rollouts.with_(extras=dict(rollouts.extras, vps_segment=segment, vps_answer_prob=probs))

    @torch.no_grad()
    def __call__(self, rollouts: Rollouts) -> Tensor:
        adv = self.base(rollouts)
        if adv.dim() != 1:
            raise ValueError("grpo_vps shapes a sequence-level base advantage; the base returned [B,T]")
        if "vps_segment" not in rollouts.extras:
            raise ValueError("grpo_vps: rollouts.extras has no probe results; the loop must call prepare(rollouts, ctx) first")
        segment, table = rollouts.extras["vps_segment"], rollouts.extras["vps_answer_prob"]
        probs = [row[~torch.isnan(row)] for row in table]
        out = vps_token_advantages(adv, rollouts.group, probs, segment, beta=self.beta, eps=self.eps)
        self.metrics = self._metrics(rollouts, probs)
        return zero_failed(out, rollouts) * rollouts.completion_mask

    @staticmethod
    def _metrics(rollouts: Rollouts, probs: list[Tensor]) -> dict[str, float]:
        correct = correctness(rollouts)
        by_outcome: dict[int, list[Tensor]] = {0: [], 1: []}
        for i, p in enumerate(probs):
            if p.numel() > 1:
                by_outcome[int(correct[i])].append(p[1:] - p[:-1])
        every = by_outcome[0] + by_outcome[1]
        pooled = torch.cat(every) if every else torch.zeros(0)

        def mean_of(parts):
            return float(torch.cat(parts).mean()) if parts else 0.0

        return {
            "vps/delta_correct": mean_of(by_outcome[1]),
            "vps/delta_incorrect": mean_of(by_outcome[0]),
            "vps/negative_step_share": float((pooled < 0).float().mean()) if pooled.numel() else 0.0,
        }

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state.get("base", {}))
