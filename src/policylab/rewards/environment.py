"""Rewards that read what the agent engine recorded (rollout/agent.py): the environment's return and its
exact success check. They are rollout-level rewards (``reads_rollouts``): the reward stage passes them the
batch, since an episode's outcome is in the environment, not in the completion text."""

from __future__ import annotations

from policylab.registry import register


class RolloutFieldReward:
    """A reward that is one declared per-row field of the batch (written by the rollout engine)."""

    reads_rollouts = True
    field_name = ""

    def __call__(self, prompt: str, completion: str, row: dict) -> float:
        raise TypeError(f"reward {self.field_name!r} reads the agent engine's field {self.field_name!r}; it needs the "
                        "batch (RewardCombiner(..., rollouts=batch)) and rollout.engine: agent")

    def score_rollouts(self, rollouts) -> list[float]:
        if self.field_name not in rollouts.extras:
            raise KeyError(f"reward {self.field_name!r} needs rollouts.extras[{self.field_name!r}], which the 'agent' "
                           "rollout engine writes; set rollout.engine.name: agent")
        return [float(v) for v in rollouts.extras[self.field_name]]


@register("reward", "env_return", spec="data_agents_eval.md D0 (trajectory return: sparse or dense turn rewards)")
class EnvReturn(RolloutFieldReward):
    """The trajectory return: the sum of the engine's placed turn rewards (sparse: 1 on success, dense: D0's
    normalised increments); NaN (a failed reward) after an environment error."""

    field_name = "env_return"


@register("reward", "env_success", spec="data_agents_eval.md D0 (the environment's exact success check)")
class EnvSuccess(RolloutFieldReward):
    """1.0 where the environment's exact success check passed (the goal reached, the answer exact)."""

    field_name = "env_success"
