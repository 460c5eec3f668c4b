"""What a component may reach beyond the Rollouts: the models, and scoring passes over them.

Component hooks the loop honours (all optional, looked up on the built component object):
- ``needs_reference() -> bool``: the reference model is loaded and ``rollouts.ref_logp`` filled.
- ``needs_hidden = True``: the training forward fills ``PolicyOutputs.hidden`` [B,T,H].
- ``needs_entropy_grad = True``: ``PolicyOutputs.entropy`` keeps its graph (entropy losses).
- ``prepare(rollouts, ctx) -> Rollouts``: runs after rewards, before advantages, with this context
  (probe passes, value estimates, judges). Stateful components also give ``state_dict``/``load_state_dict``.
- ``after_step(metrics: dict) -> None``: once per training step, after its optimizer steps (controllers, EMAs);
  ``metrics`` holds the step's update metrics and ``lr``.
- ``last_metrics``: a dict of floats merged into the step's metrics (advantages cannot return metrics).
- ``logits_processor() -> LogitsProcessor | None``: applied during sampling (not greedy eval), before the
  behaviour log-probs are recorded (HAPO's adaptive temperature).
- ``needs_whole_groups = True``: micro- and mini-batches are cut at group boundaries.
- The sampler's ``update({"index": [...], "pass_rate": [...], "step": n})`` is called after each generation round.
- ``ctx.extras["reward"]`` is the run's reward combiner ``(prompts, completions, rows) -> (total, components)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from policylab.rollouts import PolicyOutputs, Rollouts


@dataclass
class TrainContext:
    model: Any  # the policy (a transformers causal LM)
    tokenizer: Any
    ref_model: Any | None
    device: Any
    step: int = 0
    config: Any = None  # the validated Recipe
    # (rollouts, model=None, with_hidden=False) -> PolicyOutputs over completion positions, no grad
    score: Callable[..., PolicyOutputs] | None = None
    # (prompts: list[str], **sampling overrides) -> Rollouts; for components that need extra generations
    generate: Callable[..., Rollouts] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
