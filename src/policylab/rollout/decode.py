"""The ``hf_pruned`` rollout engine: our own sampling loop over a transformers model's KV cache that
drops finished rows from the batch, so a step never pays for completions that already ended.

transformers' ``generate`` keeps every row until the longest finishes; with RLVR's skewed length
distributions most of a late decode step is padding. The G rows of a prompt also share one prefill
(its keys/values are computed once and repeated; ~2 s of a 4x8 SmolLM2 step on this CPU). Same
sampling semantics as the ``hf`` engine (temperature, top-k, top-p, EOS; behaviour log-probs of the
tempered distribution before top-k/top-p truncation, as the hf engine records them and as the
training forward computes them), the same requests (task rows or chat ``messages``) and the same
engine-neutral ``sampling.transforms``, applied to the raw logits before the temperature.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import DynamicCache

from policylab.algo.logits_transforms import apply_transforms
from policylab.registry import register
from policylab.rollout.hf import TEMPERATURE_FACTOR, HFEngine, Sampling, eos_token_ids, mean_factor
from policylab.models.kv_cache import cache_kwargs
from policylab.rollouts import Rollouts


def filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus with mass >= top_p to -inf."""
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        remove_sorted = mass_before >= top_p  # keeps the first token always (mass before it is 0)
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def draw_inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of (unnormalised) probabilities [B,V], drawn by inverse CDF in float64.

    torch.multinomial draws one exponential per vocabulary entry (1.5 M random numbers for 32 rows of
    SmolLM2: 26 ms of a ~100 ms decode step on this CPU); one float64 uniform per row against a float64
    cumulative sum draws from the same distribution in under 2 ms. A zero-probability entry is never
    drawn: its interval [cdf[i-1], cdf[i]) is empty, and u stays below the total.
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding must not reach the total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def draw_multinomial(probs: torch.Tensor) -> torch.Tensor:
    """torch.multinomial's draw: the random stream transformers' generate uses (for exact comparisons)."""
    return torch.multinomial(probs, 1).squeeze(-1)


class PrunedDecodeEngine(HFEngine):
    """Sampling with a KV cache, removing finished rows from the cache after every decode step.

    ``draw``: ``"inverse_cdf"`` (default, fast) or ``"multinomial"`` (transformers' random stream, so a
    seeded run reproduces the ``hf`` engine token for token). Both sample the same distribution.
    """

    name = "hf_pruned"

    def __init__(self, draw: Literal["inverse_cdf", "multinomial"] = "inverse_cdf"):
        super().__init__()
        draws = {"inverse_cdf": draw_inverse_cdf, "multinomial": draw_multinomial}
        if draw not in draws:
            raise ValueError(f"hf_pruned draw {draw!r}: choose one of {sorted(draws)}")
        self.draw = draws[draw]

    @torch.no_grad()
    def _generate_chunk(self, model, tokenizer, prompts: list[str], s: Sampling) -> Rollouts:
        device = next(model.parameters()).device
        # the G rows of a prompt share its prefill: each distinct prompt runs once, its cache is repeated
        slot = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        distinct = list(slot)
        inverse = torch.tensor([slot[p] for p in prompts], device=device)
        enc = tokenizer(distinct, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        eos = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=device)
        pad = tokenizer.pad_token_id
        was_training = model.training
        model.eval()
        positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=positions,
                       **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
        if len(distinct) < len(prompts):
            cache.batch_select_indices(inverse)
        logits, positions = logits[inverse], positions[inverse]
        prompt_ids, prompt_mask = enc.input_ids[inverse], enc.attention_mask[inverse]
        batch = len(prompts)
        tokens, logps, factors, lengths, finished_with_eos = sample_from_cache(
            model, logits, cache, prompt_mask, positions[:, -1] + 1, s, eos, self.draw, self.name)
        model.train(was_training)
        width = int(lengths.max()) if batch else 0
        mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()
        completion_ids = torch.where(mask > 0, tokens[:, :width], torch.full_like(tokens[:, :width], pad))
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollouts(
            prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(), completion_ids=completion_ids.cpu(),
            completion_mask=mask.cpu(), group=torch.zeros(batch, dtype=torch.long), truncated=(~finished_with_eos).cpu(),
            prompts=prompts, completions=texts, behavior_logp=(logps[:, :width] * mask).cpu(),
            extras={TEMPERATURE_FACTOR.name: mean_factor(factors[:, :width].cpu(), mask.cpu())},
        )


@torch.no_grad()
def sample_from_cache(model, logits: torch.Tensor, cache, attention: torch.Tensor, next_pos: torch.Tensor, s: Sampling,
                      eos: torch.Tensor, draw, engine: str, stop=None):
    """The KV-cached sampling loop after a prefill: ``logits`` [B,V] predict each row's next token, ``cache``
    holds the rows' keys/values, ``attention`` [B,L] their attention mask, ``next_pos`` [B] the next position.

    Rows that sampled an EOS id (or for which ``stop(rows, t, tokens)`` says True: a stop string such as a
    tool-call close tag) leave the batch and the cache. Returns (tokens [B,N], behaviour log-probs [B,N],
    temperature factors [B,N], lengths [B], ended [B] bool = stopped by EOS or ``stop``), N = max_new_tokens.
    """
    device = logits.device
    batch = logits.shape[0]
    pad = 0
    tokens = torch.full((batch, s.max_new_tokens), pad, dtype=torch.long, device=device)
    logps = torch.zeros(batch, s.max_new_tokens, device=device)
    factors = torch.ones(batch, s.max_new_tokens, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    finished_with_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    active = torch.arange(batch, device=device)  # original row of each cache row
    for t in range(s.max_new_tokens):
        scores = logits.float()
        if s.temperature == 0:
            chosen = scores.argmax(-1)
            logp = torch.log_softmax(scores, -1).gather(-1, chosen[:, None]).squeeze(-1)
        else:
            if s.transforms:  # engine-neutral transforms of the raw logits, ahead of the temperature
                scores, factor = apply_transforms(scores, s.transforms, engine)
                factors[active, t] = factor
            scores = scores / s.temperature
            filtered = filter_top_k_top_p(scores, s.top_k, s.top_p)
            chosen = draw(torch.softmax(filtered, -1))
            # log-prob under the tempered, untruncated distribution: what the training forward computes
            # (and what the hf engine records), so the on-policy ratio is exactly 1
            logp = torch.log_softmax(scores, -1).gather(-1, chosen[:, None]).squeeze(-1)
        tokens[active, t] = chosen
        logps[active, t] = logp
        lengths[active] = t + 1
        done = torch.isin(chosen, eos)
        if stop is not None:
            done = done | stop(active, t, tokens)
        finished_with_eos[active[done]] = True
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0 or t + 1 == s.max_new_tokens:
            break
        if keep.numel() < active.numel():
            cache.batch_select_indices(keep)
            active, attention, chosen, next_pos = active[keep], attention[keep], chosen[keep], next_pos[keep]
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        logits = model(input_ids=chosen[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                       **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
    return tokens, logps, factors, lengths, finished_with_eos


register("rollout_engine", "hf_pruned", spec="performance issue: generation that stops paying for finished rows")(PrunedDecodeEngine)
