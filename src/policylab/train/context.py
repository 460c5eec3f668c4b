"""The StageContext the loop hands to annotators and batch transforms (policylab/interfaces.py).

It carries the models and two services, both built on the loop's own machinery: ``score`` is the
optimised teacher-forced forward (packed, chunked) without grad, ``generate`` is the recipe's rollout
engine. Nothing else reaches a component: no recipe object, no untyped extras.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from policylab.rollouts import PolicyOutputs, Rollouts


@dataclass
class TrainContext:
    policy: Any  # the trained model (a transformers causal LM)
    tokenizer: Any
    reference: Any | None  # the frozen reference policy, when an annotator declared needs_reference_model
    device: Any
    temperature: float  # the training forward's temperature (the rollout temperature; 1 for greedy)
    # (prompts, completions, rows) -> (total [B], components {name: [B]}): the run's reward combiner
    reward: Callable[..., Any]
    # (rollouts, model=None, with_hidden=False) -> PolicyOutputs over completion positions, no grad
    score: Callable[..., PolicyOutputs]
    # (requests, **sampling overrides) -> Rollouts, through the recipe's engine
    generate: Callable[..., Rollouts]
    step: int = 0
    total_steps: int = 0  # train.steps of the run (schedules that relax over a fraction of the run)
