"""The ``hf`` rollout engine: transformers ``generate`` with left padding, G completions per prompt,
behaviour log-probs captured during sampling without keeping a [B,T,V] tensor, EOS/truncation handling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from policylab.registry import register
from policylab.rollouts import Rollouts


@dataclass
class SamplingSettings:
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    batch_size: int = 0  # completions per generate() call; 0 = all at once


def format_prompt(tokenizer, row: dict) -> str:
    """The prompt text the model sees: the chat template when the tokenizer has one, else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if row.get("system"):
            messages.append({"role": "system", "content": row["system"]})
        messages.append({"role": "user", "content": row["prompt"]})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (row["system"] + "\n" if row.get("system") else "") + row["prompt"]


class BehaviourLogprobs(LogitsProcessor):
    """Records log pi_behaviour(token) of each sampled token from the tempered scores.

    It runs after temperature (and component processors) but before generate's top-k/top-p warpers,
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


class HFEngine:
    """Sampling with transformers generate; returns Rollouts with behaviour log-probs."""

    def __init__(self):
        pass

    @torch.no_grad()
    def generate(self, model, tokenizer, rows: list[dict], settings: SamplingSettings, group_offset: int = 0,
                 logits_processors: list | None = None) -> Rollouts:
        """G completions per row. ``logits_processors`` (from components' ``logits_processor`` hooks, e.g.
        HAPO's adaptive temperature) run first, so the behaviour log-probs include their effect."""
        prompts = [format_prompt(tokenizer, r) for r in rows]
        g = settings.group_size
        expanded_prompts = [p for p in prompts for _ in range(g)]
        expanded_rows = [r for r in rows for _ in range(g)]
        groups = torch.arange(len(rows)).repeat_interleave(g) + group_offset
        chunk = settings.batch_size or len(expanded_prompts)
        parts = [self._generate_chunk(model, tokenizer, expanded_prompts[i:i + chunk], settings, logits_processors or [])
                 for i in range(0, len(expanded_prompts), chunk)]
        out = Rollouts.concat(parts) if len(parts) > 1 else parts[0]
        out.group = groups
        out.rows = expanded_rows
        return out

    def _generate_chunk(self, model, tokenizer, prompts: list[str], s: SamplingSettings, extra_processors: list) -> Rollouts:
        device = next(model.parameters()).device
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        prompt_len = enc.input_ids.shape[1]
        recorder = BehaviourLogprobs(prompt_len)
        greedy = s.temperature == 0
        processors = LogitsProcessorList(extra_processors if not s.temperature == 0 else [])
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=sorted(eos_token_ids(model, tokenizer)), return_dict_in_generate=False)
        if greedy:
            kwargs.update(do_sample=False)
        else:
            # temperature goes in as a processor ahead of the recorder; top-k/top-p run after it as warpers
            processors.append(TemperatureOnly(s.temperature))
            kwargs.update(do_sample=True, temperature=1.0, top_p=s.top_p, top_k=s.top_k or None)
        processors.append(recorder)
        was_training = model.training
        model.eval()
        sequences = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                   logits_processor=processors, **kwargs)
        model.train(was_training)
        completion_ids = sequences[:, prompt_len:]
        steps = completion_ids.shape[1]
        behaviour = recorder.finish(sequences, steps)[:, :steps]
        mask, truncated = completion_masks(completion_ids, eos_token_ids(model, tokenizer))
        completion_ids = torch.where(mask > 0, completion_ids, torch.full_like(completion_ids, tokenizer.pad_token_id))
        texts = tokenizer.batch_decode(completion_ids * mask.long() + tokenizer.pad_token_id * (1 - mask.long()),
                                       skip_special_tokens=True)
        return Rollouts(
            prompt_ids=enc.input_ids.cpu(), prompt_mask=enc.attention_mask.cpu(), completion_ids=completion_ids.cpu(),
            completion_mask=mask.cpu(), group=torch.zeros(len(prompts), dtype=torch.long), truncated=truncated.cpu(),
            prompts=prompts, completions=texts, behavior_logp=(behaviour * mask).cpu(),
        )


register("rollout_engine", "hf", spec="foundation issue §5")(HFEngine)
