"""Shared test factories: hand-sized Rollouts, a tiny model, and a StageContext for annotators.

Tests (ours and a user's for their own component) build inputs here instead of hand-rolling a
``Rollouts(...)`` per file, so a change to the container reaches every test at once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from policylab.rollouts import Rollouts


def make_rollouts(
    rewards: Sequence[float] | None = None,
    *,
    group: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
    width: int | None = None,
    prompt_len: int = 1,
    completion_ids: Any = None,
    prompt_ids: Any = None,
    prompt_mask: Any = None,
    truncated: Sequence[bool] | None = None,
    batch: int | None = None,
    vocab: int = 0,
    seed: int = 0,
    reward_components: dict[str, Sequence[float]] | None = None,
    extras: dict[str, Any] | None = None,
    **fields: Any,
) -> Rollouts:
    """A Rollouts of B rows (from ``rewards``, ``lengths``, ``group`` or ``batch``), right-padded masks.

    ``lengths``: trained tokens per row (default 1); ``width``: padded width (default the longest);
    ``group``: prompt index per row (default all 0); ``vocab > 0`` draws random token ids (seeded),
    otherwise ids are 1. Any other Rollouts attribute (``behavior_logp``, ``ref_logp``, ``entropy``,
    ``prompts``, ``completions``, ``rows``, ``advantages``, ...) passes through ``fields``; tensors given as
    lists are converted. ``reward_components`` values become float tensors; ``extras`` must be declared fields.
    """
    sizes = [len(x) for x in (rewards, group, lengths, truncated) if x is not None]
    b = batch if batch is not None else (sizes[0] if sizes else 1)
    if any(s != b for s in sizes):
        raise ValueError(f"make_rollouts: rewards/group/lengths/truncated have different lengths {sizes}")
    lengths = [1] * b if lengths is None else list(lengths)
    width = width if width is not None else max([*lengths, 1])
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    g = torch.Generator().manual_seed(seed)
    if completion_ids is None:
        completion_ids = (torch.randint(1, vocab, (b, width), generator=g) if vocab > 1
                          else torch.ones(b, width, dtype=torch.long))
    if prompt_ids is None:
        prompt_ids = (torch.randint(1, vocab, (b, prompt_len), generator=g) if vocab > 1
                      else torch.ones(b, prompt_len, dtype=torch.long))
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.float) if prompt_mask is None else torch.as_tensor(prompt_mask)
    for name, value in list(fields.items()):
        if isinstance(value, (list, tuple)) and name not in ("prompts", "completions", "rows"):
            fields[name] = torch.as_tensor(value, dtype=torch.float32)
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.as_tensor(completion_ids, dtype=torch.long),
        completion_mask=mask,
        group=torch.tensor(list(group) if group is not None else [0] * b, dtype=torch.long),
        truncated=torch.tensor(list(truncated) if truncated is not None else [False] * b, dtype=torch.bool),
        rewards=None if rewards is None else torch.tensor(list(rewards), dtype=torch.float32),
        reward_components={k: torch.tensor(list(v), dtype=torch.float32) for k, v in (reward_components or {}).items()},
        extras=dict(extras or {}),
        **fields,
    )


def logp_batch(new_logp, old_logp, adv, mask=None) -> tuple[Rollouts, torch.Tensor]:
    """(a [B,T] batch with ``old_logp`` and advantages ``adv`` ([B] or [B,T]), the policy log-probs as a leaf
    tensor that requires grad): the hand-computed objective tests' fixture."""
    new_logp = torch.as_tensor(new_logp, dtype=torch.float32)
    b, t = new_logp.shape
    batch = make_rollouts(lengths=[t] * b, old_logp=torch.as_tensor(old_logp, dtype=torch.float32),
                          advantages=torch.as_tensor(adv, dtype=torch.float32))
    if mask is not None:
        batch.completion_mask = torch.as_tensor(mask, dtype=torch.float32)
    return batch, new_logp.clone().requires_grad_(True)


def random_logp(b: int, width: int, *, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """[B,T] plausible log-probs (negative), seeded."""
    g = torch.Generator().manual_seed(seed)
    return -(torch.rand(b, width, generator=g) * scale + 0.05)


def tiny_model(seed: int = 0, vocab: int = 128, hidden: int = 32, layers: int = 2):
    """A seeded LlamaForCausalLM small enough for a unit test (eval mode, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def make_context(policy=None, tokenizer=None, *, reference=None, step: int = 0, temperature: float = 1.0,
                 reward=None, engine=None, chunk: int = 128, total_steps: int = 0):
    """A StageContext (train/context.py) over ``policy``: ``score`` is the loop's teacher-forced forward,
    ``generate`` goes through ``engine`` (default: a bound ``hf`` engine) when a policy is given."""
    from policylab.interfaces import Sampling
    from policylab.models.forward import policy_forward
    from policylab.rollouts import PolicyOutputs
    from policylab.train.context import TrainContext

    @torch.no_grad()
    def score(rollouts: Rollouts, model=None, with_hidden: bool = False) -> PolicyOutputs:
        out = policy_forward(model or policy, rollouts, temperature=temperature, chunk=chunk, with_hidden=with_hidden)
        mask = rollouts.completion_mask
        return PolicyOutputs(logp=out.logp.detach() * mask, entropy=out.entropy.detach() * mask,
                             hidden=None if out.hidden is None else out.hidden.detach())

    def generate(requests, **overrides) -> Rollouts:
        nonlocal engine
        if engine is None:
            from policylab.rollout.hf import HFEngine

            engine = HFEngine()
            engine.bind(policy, tokenizer)
        return engine.generate(requests, Sampling(**overrides))

    def no_reward(*_):
        raise RuntimeError("make_context: no reward given")

    return TrainContext(policy=policy, tokenizer=tokenizer, reference=reference, device="cpu", temperature=temperature,
                        reward=reward or no_reward, score=score, generate=generate, step=step, total_steps=total_steps)


def fill_required(component, rollouts: Rollouts, *, seed: int = 0, hidden: int = 8, ctx=None) -> Rollouts:
    """The extras fields ``component`` requires and ``rollouts`` lacks: computed by the registered component
    that provides them (its ``annotate`` run on ``rollouts`` with ``ctx``) where that pass needs no model,
    else seeded values that fit their declarations (policylab.fields)."""
    from policylab import fields as F
    from policylab import registry
    from policylab.interfaces import declared

    gen = torch.Generator().manual_seed(seed)
    b, width = rollouts.completion_ids.shape
    extras = dict(rollouts.extras)
    missing = [n for n in declared(component, "requires") if n not in F.CORE_FIELDS and n not in extras]
    for kind in registry.KINDS:
        for entry in registry.entries(kind).values():
            if callable(getattr(entry.target, "provides", ())) or not callable(getattr(entry.target, "annotate", None)):
                continue
            provides = declared(entry.target, "provides")
            if any(n in provides for n in missing):
                try:
                    values = registry.build(kind, entry.name).annotate(rollouts.with_(extras=extras), ctx)
                except Exception:  # noqa: BLE001 - a pass that needs a model: fall back to declared shapes
                    continue
                extras.update({k: v for k, v in values.items() if k not in F.CORE_FIELDS})
                missing = [n for n in missing if n not in extras]
    for name in declared(component, "requires"):
        if name in F.CORE_FIELDS or name in extras:
            continue
        spec = F.lookup(name)
        if not spec.per_row:
            extras[name] = 1.0
        elif spec.shape == "list[B]":
            extras[name] = [None] * b
        else:
            dims = [d.strip() for d in spec.shape.strip("[]").split(",")[1:] if d.strip() != "*"]
            shape = [b] + [width if d == "T" else hidden if d == "H" else 2 for d in dims]
            if spec.dtype == "bool":
                extras[name] = torch.rand(shape, generator=gen) > 0.5
            elif spec.dtype == "long":
                extras[name] = torch.zeros(shape, dtype=torch.long)
            else:
                extras[name] = torch.rand(shape, generator=gen)
    return rollouts.with_(extras=extras)
