"""Shared helpers of the probe family: base advantages, correctness, step segmentation, scoring passes.

Nothing here is registered. The forward helpers run the policy on hand-built (prompt, completion) token
batches so probes control exactly which tokens are scored (the loop's ``ctx.score`` takes whole Rollouts).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import Tensor

from policylab import registry
from policylab.algo.group_stats import group_index
from policylab.rollouts import Rollouts


# -- base advantages and outcome facts ---------------------------------------------------------------


class BaseAdvantage:
    """A registered advantage that a shaping method starts from (e.g. ``grpo``), built once.

    Stateful bases (BNPO, ...) keep their state: ``state_dict``/``load_state_dict`` pass through.
    """

    def __init__(self, name: str = "grpo", params: dict[str, Any] | None = None):
        self.name = name
        self.component = registry.build("advantage", name, params or {}, where=f"base advantage {name!r}")

    def __call__(self, rollouts: Rollouts) -> Tensor:
        adv = self.component(rollouts)
        return adv.float()

    def state_dict(self) -> dict:
        fn = getattr(self.component, "state_dict", None)
        return fn() if callable(fn) else {}

    def load_state_dict(self, state: dict) -> None:
        fn = getattr(self.component, "load_state_dict", None)
        if callable(fn) and state:
            fn(state)


def require_rewards(rollouts: Rollouts, who: str) -> Tensor:
    if rollouts.rewards is None:
        raise ValueError(f"{who} needs rollouts.rewards; run the reward stage first")
    return rollouts.rewards.float()


def correctness(rollouts: Rollouts, threshold: float = 0.0) -> Tensor:
    """[B] 1.0 where the rollout is correct: the ``accuracy`` reward component if present, else reward > threshold.

    Failed (NaN) rewards count as incorrect.
    """
    if "accuracy" in rollouts.reward_components:
        acc = rollouts.reward_components["accuracy"].float()
        return (torch.nan_to_num(acc, nan=0.0) > 0.5).float()
    r = require_rewards(rollouts, "correctness")
    return (torch.nan_to_num(r, nan=threshold - 1.0) > threshold).float()


def group_rank(group: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: its 0-based position among its group's rows (order of appearance) and the group size."""
    idx, k = group_index(group)
    rank = torch.zeros_like(idx)
    size = torch.zeros(k, dtype=torch.long).index_add_(0, idx, torch.ones_like(idx))
    seen = torch.zeros(k, dtype=torch.long)
    for i, g in enumerate(idx.tolist()):
        rank[i] = seen[g]
        seen[g] += 1
    return rank, size[idx]


def broadcast_tokens(adv: Tensor, mask: Tensor) -> Tensor:
    """[B] or [B,T] advantages as [B,T] (zeros on masked positions)."""
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(mask)
    return adv * mask


# -- text segmentation on token boundaries -----------------------------------------------------------


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The decoded text of each token on its own (for locating delimiters on token boundaries)."""
    return [tokenizer.decode([int(t)]) for t in ids]


def segment_ends(
    pieces: Sequence[str],
    delimiter: str,
    *,
    stop_marker: str | None = None,
    max_segments: int | None = None,
) -> list[int]:
    """Inclusive token positions that end a reasoning step.

    A step ends at the token where the text so far ends with ``delimiter`` (e.g. "\\n\\n"; SPAE uses
    ".\\n\\n"); scanning stops at the first token whose text so far contains ``stop_marker`` (e.g. "</think>"). With more than ``max_segments`` ends, keep ``max_segments`` of them evenly spaced,
    always including the last (merging neighbouring steps; the choice of which to merge is ours).
    """
    ends: list[int] = []
    text = ""
    for t, piece in enumerate(pieces):
        text += piece
        if stop_marker and stop_marker in text:
            break
        if delimiter and text.endswith(delimiter):
            ends.append(t)
    if max_segments is not None and len(ends) > max_segments:
        if max_segments <= 0:
            return []
        keep = torch.linspace(0, len(ends) - 1, max_segments).round().long().tolist()
        ends = [ends[k] for k in sorted(set(keep))]
    return ends


def stop_position(pieces: Sequence[str], stop_marker: str | None) -> int | None:
    """First token position at which the text so far contains ``stop_marker`` (None if never)."""
    if not stop_marker:
        return None
    text = ""
    for t, piece in enumerate(pieces):
        text += piece
        if stop_marker in text:
            return t
    return None


def segment_of_tokens(ends: Sequence[int], length: int) -> Tensor:
    """[length] long: 0-based step index of each token (tokens after the last end get len(ends))."""
    seg = torch.full((length,), len(ends), dtype=torch.long)
    start = 0
    for k, end in enumerate(ends):
        seg[start : end + 1] = k
        start = end + 1
    return seg


# -- forward passes -----------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model):
    """Run probe passes in eval mode (no dropout) and restore the model's mode afterwards."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS would break teacher-forced continuations)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def prompt_tokens(rollouts: Rollouts, i: int) -> list[int]:
    """Row i's real prompt token ids (left padding removed)."""
    keep = rollouts.prompt_mask[i].bool()
    return rollouts.prompt_ids[i][keep].tolist()


def completion_tokens(rollouts: Rollouts, i: int) -> list[int]:
    """Row i's completion token ids up to its last trained token (right padding removed)."""
    mask = rollouts.completion_mask[i]
    nz = mask.nonzero()
    end = int(nz.max()) + 1 if nz.numel() else 0
    return rollouts.completion_ids[i, :end].tolist()


def completion_forward(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    *,
    with_hidden: bool = False,
    hidden_layer: int = -1,
    with_prompt_hidden: bool = False,
) -> dict[str, Tensor]:
    """One teacher-forced pass: log-probs [N,T], entropies [N,T] (and hidden [N,T,H]) of completion tokens.

    Prompts are left padded; positions restart at each row's first real token. ``hidden`` at completion
    position t is the state that predicts token t (aligned with logp/entropy). ``prompt_hidden`` [N,P,H]
    covers the prompt positions. Gradients flow unless the caller wraps this in ``torch.no_grad``.
    """
    device = model_device(model)
    prompt_ids, prompt_mask, completion_ids = prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device)
    p, t = prompt_ids.shape[1], completion_ids.shape[1]
    if p == 0:
        raise ValueError("completion_forward needs at least one prompt token per row")
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask.long(), torch.ones_like(completion_ids)], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    need_hidden = with_hidden or with_prompt_hidden
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, output_hidden_states=need_hidden)
    logits = out.logits[:, p - 1 : p + t - 1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    result = {
        "logp": logp_all.gather(-1, completion_ids[..., None]).squeeze(-1),
        "entropy": -(logp_all.exp() * logp_all).sum(-1),
    }
    if need_hidden:
        states = out.hidden_states[hidden_layer]
        if with_hidden:
            result["hidden"] = states[:, p - 1 : p + t - 1].float()
        if with_prompt_hidden:
            result["prompt_hidden"] = states[:, :p].float()
    return result


@torch.no_grad()
def score_in_chunks(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                    *, chunk: int = 16, with_hidden: bool = False, hidden_layer: int = -1) -> list[dict[str, Tensor]]:
    """Teacher-forced scores of many (prompt, completion) token lists; one dict of unpadded tensors per pair."""
    results: list[dict[str, Tensor]] = []
    with eval_mode(model):
        _score_chunks(model, prompts, completions, pad_id, chunk, with_hidden, hidden_layer, results)
    return results


def _score_chunks(model, prompts, completions, pad_id, chunk, with_hidden, hidden_layer, results) -> None:
    for start in range(0, len(prompts), chunk):
        ps, cs = prompts[start : start + chunk], completions[start : start + chunk]
        pid, pmask = pad_left(ps, pad_id)
        cid, _ = pad_right(cs, pad_id)
        if cid.shape[1] == 0:
            results.extend({"logp": torch.zeros(0), "entropy": torch.zeros(0)} for _ in cs)
            continue
        out = completion_forward(model, pid, pmask, cid, with_hidden=with_hidden, hidden_layer=hidden_layer)
        for j, c in enumerate(cs):
            results.append({k: v[j, : len(c)].cpu() for k, v in out.items()})


def corrupt_prompts(prompt_ids: Tensor, prompt_mask: Tensor, *, mask_prob: float, replacement_id: int,
                    generator: torch.Generator, protect_last: int = 0) -> Tensor:
    """Text analogue of image masking (VPPO D3, PAPO E6): replace each real prompt token with prob ``mask_prob``.

    The last ``protect_last`` real tokens (e.g. the question and the generation prompt) are never masked.
    Positions and attention stay as they were, as blacked-out patches keep the image size.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    draw = (torch.rand(prompt_ids.shape, generator=generator) < mask_prob).to(prompt_ids.device)
    real = prompt_mask.bool()
    if protect_last > 0:
        from_end = real.flip(-1).long().cumsum(-1).flip(-1)  # 1 at the last real token, 2 before it, ...
        real = real & (from_end > protect_last)
    return torch.where(draw & real, torch.full_like(prompt_ids, replacement_id), prompt_ids)


@torch.no_grad()
def sample_continuations(model, contexts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
                         temperature: float, eos_id: int | None, pad_id: int, generator: torch.Generator,
                         chunk: int = 32) -> list[dict[str, Any]]:
    """``num_samples`` continuations of each context (context-major order), drawn from softmax(logits/T).

    Each result: ``tokens`` (list, up to and including EOS), ``logp`` [n] of the drawn tokens and
    ``entropy`` [n] of the distributions they were drawn from. Sampling uses ``generator`` on the CPU,
    so a seeded generator gives the same draws on any device. Decoding reuses the KV cache.
    """
    if temperature <= 0:
        raise ValueError(f"probe sampling temperature must be > 0, got {temperature}")
    flat = [list(c) for c in contexts for _ in range(num_samples)]
    results: list[dict[str, Any]] = []
    with eval_mode(model):
        for start in range(0, len(flat), chunk):
            results.extend(_sample_chunk(model, flat[start : start + chunk], max_new_tokens, temperature, eos_id, pad_id,
                                         generator))
    return results


def _sample_chunk(model, flat, max_new_tokens, temperature, eos_id, pad_id, generator) -> list[dict[str, Any]]:
    device = model_device(model)
    results: list[dict[str, Any]] = []
    ids, mask = pad_left(flat, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    n = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, last_pos = out.past_key_values, positions[:, -1:]
    logits = out.logits[:, -1]
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    entropies: list[list[float]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1).cpu()
        entropy = -(logp.exp() * logp).sum(-1)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        for j in (~done).nonzero().flatten().tolist():
            tokens[j].append(int(nxt[j]))
            logps[j].append(float(logp[j, nxt[j]]))
            entropies[j].append(float(entropy[j]))
        if eos_id is not None:
            done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt[:, None].to(device), attention_mask=mask, position_ids=last_pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    for j in range(n):
        results.append({"tokens": tokens[j], "logp": torch.tensor(logps[j]), "entropy": torch.tensor(entropies[j])})
    return results


def sample_mean_entropies(model, contexts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
                          temperature: float, eos_id: int | None, pad_id: int, generator: torch.Generator,
                          chunk: int = 32) -> Tensor:
    """[len(contexts), num_samples]: mean token entropy of each short sampled continuation (its own length)."""
    samples = sample_continuations(model, contexts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                   temperature=temperature, eos_id=eos_id, pad_id=pad_id, generator=generator, chunk=chunk)
    means = torch.tensor([float(s["entropy"].mean()) if s["entropy"].numel() else 0.0 for s in samples])
    return means.view(len(contexts), num_samples)


def zero_failed(adv: Tensor, rollouts: Rollouts) -> Tensor:
    """Rows whose reward failed (NaN) get advantage 0, whatever the shaping added (contract of advantages)."""
    if rollouts.rewards is None:
        return adv
    failed = torch.isnan(rollouts.rewards.float())
    if not bool(failed.any()):
        return adv
    shape = (-1,) + (1,) * (adv.dim() - 1)
    return torch.where(failed.view(shape).to(adv.device), torch.zeros_like(adv), adv)


@torch.no_grad()
def perturbed_prompt_logp(rollouts: Rollouts, ctx, *, mask_prob: float, protect_last: int, generator: torch.Generator,
                          batch_size: int = 16) -> Tensor:
    """[B,T] log-probs of the same completions under corrupted prompts (text analogue of a masked image;
    VPPO D3 "aug", PAPO E6). Uses the loop's scorer when it has one (same temperature as the policy's
    log-probs), else a plain teacher-forced pass."""
    if ctx is None or getattr(ctx, "model", None) is None:
        raise ValueError("a perturbed-prompt pass needs ctx.model in prepare()")
    tok = getattr(ctx, "tokenizer", None)
    replacement = getattr(tok, "unk_token_id", None)
    if replacement is None:
        replacement = pad_id_of(tok) if tok is not None else 0
    corrupted = corrupt_prompts(rollouts.prompt_ids, rollouts.prompt_mask, mask_prob=mask_prob,
                                replacement_id=int(replacement), generator=generator, protect_last=protect_last)
    aug = rollouts.with_(prompt_ids=corrupted)
    if getattr(ctx, "score", None) is not None:
        return ctx.score(aug).logp.float().cpu() * rollouts.completion_mask
    out = torch.zeros(rollouts.completion_ids.shape)
    with eval_mode(ctx.model):
        for start in range(0, rollouts.batch_size, batch_size):
            rows = slice(start, start + batch_size)
            res = completion_forward(ctx.model, corrupted[rows], rollouts.prompt_mask[rows], rollouts.completion_ids[rows])
            out[rows] = res["logp"].float().cpu()
    return out * rollouts.completion_mask
