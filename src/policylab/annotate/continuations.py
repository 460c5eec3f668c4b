"""Short sampled continuations of exact token prefixes (SPAE's probe confidence, BRPO's budget summaries).

Why not ``ctx.generate``: the rollout engines take task rows (``{"prompt": ...}`` or ``{"messages": ...}``)
and format them through the chat template, so they cannot continue a given token prefix — the prompt as
the engine tokenised it, plus part of a completion, plus a probe string — without re-tokenising decoded
text (not token-identical) or wrapping it in a second template. Until an engine accepts token-id
requests, this module keeps the one KV-cached decode loop the probes need. It samples with a seeded CPU
generator, so a component's draws are reproducible and resumable from its ``state_dict``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import Tensor

from policylab.annotate.token_batches import pad_left
from policylab.models.kv_cache import cache_kwargs, returned_cache


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
    ids, mask = pad_left(flat, pad_id)
    ids, mask = ids.to(device), mask.long().to(device)
    n = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, last_pos = returned_cache(out), positions[:, -1:]
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
                    **cache_kwargs(model, cache), use_cache=True)
        cache, logits = returned_cache(out), out.logits[:, -1]
    return [{"tokens": tokens[j], "logp": torch.tensor(logps[j]), "entropy": torch.tensor(entropies[j])}
            for j in range(n)]


def sample_mean_entropies(model, contexts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
                          temperature: float, eos_id: int | None, pad_id: int, generator: torch.Generator,
                          chunk: int = 32) -> Tensor:
    """[len(contexts), num_samples]: mean token entropy of each short sampled continuation (its own length)."""
    samples = sample_continuations(model, contexts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                   temperature=temperature, eos_id=eos_id, pad_id=pad_id, generator=generator, chunk=chunk)
    means = torch.tensor([float(s["entropy"].mean()) if s["entropy"].numel() else 0.0 for s in samples])
    return means.view(len(contexts), num_samples)
