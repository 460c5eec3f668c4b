"""The ``hf`` rollout engine: transformers ``generate`` with left padding, G completions per prompt,
behaviour log-probs captured during sampling without keeping a [B,T,V] tensor, EOS/truncation handling.

Both hf engines (``hf`` and ``hf_pruned``, rollout/decode.py) implement :class:`policylab.interfaces.RolloutEngine`:
``bind(model, tokenizer)`` once, then ``generate(requests, sampling, *, group_offset=0)``. A request is a task
row with ``"prompt"`` (formatted by :func:`policylab.models.chat.format_prompt`) or with ``"messages"`` (a chat
list, formatted with the tokenizer's chat template and a generation prompt). ``sampling.transforms``
(engine-neutral :class:`~policylab.interfaces.LogitsTransform` objects, policylab/algo/logits_transforms.py)
are applied to the raw logits before the temperature and before the behaviour log-probs are recorded.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from policylab.algo.logits_transforms import TRANSFORMS, apply_transforms, check_transforms
from policylab.fields import declare_field
from policylab.interfaces import Sampling
from policylab.models.chat import format_prompt
from policylab.registry import register
from policylab.rollouts import Rollouts


SamplingSettings = Sampling  # the engine-neutral settings (policylab/interfaces.py)

TEMPERATURE_FACTOR = declare_field(
    "sampling_temperature_factor", per_row=True, shape="[B]", dtype="float", owner="rollout engine",
    doc="mean over the row's completion tokens of the factor T_t/T0 by which the sampling transforms "
        "(e.g. HAPO's entropy_temperature) divided the logits; 1 without transforms or when greedy")


def format_request(tokenizer, request: dict, index: int = 0, engine: str = "hf") -> str:
    """The prompt text of one request: a ``"messages"`` chat list through the tokenizer's chat template (with
    the generation prompt; without a template, the message contents joined by newlines), else the task row's
    ``"prompt"`` through :func:`format_prompt`."""
    if not isinstance(request, dict):
        raise TypeError(f"{engine} engine: request {index} must be a dict with 'prompt' or 'messages', "
                        f"got {type(request).__name__}")
    messages = request.get("messages")
    if messages is not None:
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise ValueError(f"{engine} engine: request {index} 'messages' must be a list of "
                             "{'role': ..., 'content': ...} dicts")
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return "\n".join(str(m["content"]) for m in messages)
    if "prompt" not in request:
        raise ValueError(f"{engine} engine: request {index} has neither 'prompt' nor 'messages' "
                         f"(keys: {sorted(request)})")
    return format_prompt(tokenizer, request)


class BehaviourLogprobs(LogitsProcessor):
    """Records log pi_behaviour(token) of each sampled token from the tempered scores.

    It runs after the sampling transforms and the temperature but before generate's top-k/top-p warpers,
    so it records what the training forward computes and the on-policy ratio is exactly 1.

    generate() calls processors before sampling, so the token chosen at step t is only visible at
    step t+1 (as the last input id); we keep one [B,V] log-softmax in flight and gather then.
    """

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.pending: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []

    def _collect(self, chosen: torch.Tensor) -> None:
        if self.pending is not None:
            self.values.append(self.pending.gather(-1, chosen[:, None]).squeeze(-1))
            self.pending = None

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_len:
            self._collect(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor, steps: int) -> torch.Tensor:
        if len(self.values) < steps:
            self._collect(sequences[:, self.prompt_len + len(self.values)])
        return torch.stack(self.values, dim=1) if self.values else torch.zeros(sequences.shape[0], 0)


class TemperatureOnly(LogitsProcessor):
    """Divide by temperature (so behaviour log-probs match the training forward at the same T)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        return scores / self.temperature


def completion_masks(completion_ids: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B,T] with 1 up to and including the first EOS, truncated [B] = no EOS generated)."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    mask = (seen_before == 0).float()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    cfg = getattr(model, "generation_config", None)
    for source in (getattr(cfg, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids


class TransformProcessor(LogitsProcessor):
    """Applies ``sampling.transforms`` to the raw scores inside transformers generate (ahead of the
    temperature and the recorder) and keeps each step's temperature factor [B]."""

    def __init__(self, transforms, engine: str):
        self.transforms, self.engine = tuple(transforms), engine
        self.factors: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        scores, factor = apply_transforms(scores.float(), self.transforms, self.engine)
        self.factors.append(factor)
        return scores

    def finish(self, batch: int, steps: int, device) -> torch.Tensor:
        if not self.factors:
            return torch.ones(batch, steps, device=device)
        return torch.stack(self.factors[:steps], dim=1)


def mean_factor(factors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] mean of the per-token factors over each row's completion tokens (1 for an empty row)."""
    count = mask.sum(-1)
    total = (factors.float() * mask).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


class HFEngine:
    """Sampling with transformers generate; returns Rollouts with behaviour log-probs.

    Implements :class:`policylab.interfaces.RolloutEngine`. It samples from the bound module itself, so
    ``update_weights``/``sleep``/``wake``/``close`` have nothing to do.
    """

    name = "hf"
    provides = (TEMPERATURE_FACTOR,)
    supported_transforms = tuple(TRANSFORMS)

    def __init__(self):
        self.model = self.tokenizer = None

    def bind(self, model, tokenizer) -> None:
        """The model this engine samples from (the policy itself: weights are shared, no sync needed)."""
        self.model, self.tokenizer = model, tokenizer

    def update_weights(self, model_or_state_dict) -> None:
        """No-op: the hf engines sample from the trained module itself."""

    def sleep(self) -> None:
        """No-op: nothing to free between generations."""

    def wake(self) -> None:
        """No-op."""

    def close(self) -> None:
        """No-op."""

    @torch.no_grad()
    def generate(self, requests: list[dict], sampling: Sampling, *, group_offset: int = 0) -> Rollouts:
        """``sampling.group_size`` completions per request; groups numbered from ``group_offset``."""
        if self.model is None:
            raise RuntimeError(f"{self.name} engine: generate() before bind(model, tokenizer); "
                               "call engine.bind(model, tokenizer) first")
        if not isinstance(sampling, Sampling):
            raise TypeError(f"{self.name} engine: sampling must be a policylab.interfaces.Sampling, "
                            f"got {type(sampling).__name__}")
        check_transforms(sampling.transforms, self.name, self.supported_transforms)
        model, tokenizer = self.model, self.tokenizer
        rows = list(requests)
        if not rows:
            raise ValueError(f"{self.name} engine: generate() needs at least one request")
        prompts = [format_request(tokenizer, r, i, self.name) for i, r in enumerate(rows)]
        g = sampling.group_size
        expanded_prompts = [p for p in prompts for _ in range(g)]
        expanded_rows = [r for r in rows for _ in range(g)]
        groups = torch.arange(len(rows)).repeat_interleave(g) + group_offset
        chunk = sampling.batch_size or len(expanded_prompts)
        parts = [self._generate_chunk(model, tokenizer, expanded_prompts[i:i + chunk], sampling)
                 for i in range(0, len(expanded_prompts), chunk)]
        out = Rollouts.concat(parts) if len(parts) > 1 else parts[0]
        out.group = groups
        out.rows = expanded_rows
        return out

    def _generate_chunk(self, model, tokenizer, prompts: list[str], s: Sampling) -> Rollouts:
        device = next(model.parameters()).device
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        prompt_len = enc.input_ids.shape[1]
        recorder = BehaviourLogprobs(prompt_len)
        greedy = s.temperature == 0
        processors = LogitsProcessorList()
        transforms = TransformProcessor(s.transforms, self.name) if s.transforms and not greedy else None
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=sorted(eos_token_ids(model, tokenizer)), return_dict_in_generate=False)
        if greedy:
            kwargs.update(do_sample=False)
        else:
            # transforms, then temperature, go in as processors ahead of the recorder; top-k/top-p run after
            # them as generate's warpers
            if transforms is not None:
                processors.append(transforms)
            processors.append(TemperatureOnly(s.temperature))
            kwargs.update(do_sample=True, temperature=1.0, top_p=s.top_p, top_k=s.top_k or None)
        processors.append(recorder)
        was_training = model.training
        model.eval()
        try:
            sequences = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                       logits_processor=processors, **kwargs)
        finally:
            model.train(was_training)
        completion_ids = sequences[:, prompt_len:]
        steps = completion_ids.shape[1]
        behaviour = recorder.finish(sequences, steps)[:, :steps]
        mask, truncated = completion_masks(completion_ids, eos_token_ids(model, tokenizer))
        factors = (transforms.finish(len(prompts), steps, device) if transforms is not None
                   else torch.ones(len(prompts), steps, device=device))
        completion_ids = torch.where(mask > 0, completion_ids, torch.full_like(completion_ids, tokenizer.pad_token_id))
        texts = tokenizer.batch_decode(completion_ids * mask.long() + tokenizer.pad_token_id * (1 - mask.long()),
                                       skip_special_tokens=True)
        return Rollouts(
            prompt_ids=enc.input_ids.cpu(), prompt_mask=enc.attention_mask.cpu(), completion_ids=completion_ids.cpu(),
            completion_mask=mask.cpu(), group=torch.zeros(len(prompts), dtype=torch.long), truncated=truncated.cpu(),
            prompts=prompts, completions=texts, behavior_logp=(behaviour * mask).cpu(),
            extras={TEMPERATURE_FACTOR.name: mean_factor(factors.cpu(), mask.cpu())},
        )


register("rollout_engine", "hf", spec="foundation issue §5")(HFEngine)
