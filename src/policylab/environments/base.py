"""The environment contract of multi-turn rollouts (data_agents_eval.md D0, "Environment API").

An environment is built once per trajectory (G instances per prompt) from the registry (kind
``environment``) with the recipe's parameters. The agent engine (rollout/agent.py) calls

* ``reset(task_row, seed) -> observation``: the task row is the sampler's row (its ``prompt`` is the first
  user message; the row carries what the environment needs, e.g. a game seed); the returned text is
  appended to that first message (may be empty);
* ``step(action) -> (observation, done, reward, info)`` with the decoded action text of one assistant turn.
  ``reward`` is cumulative or incremental as the class declares in ``reward_mode`` (meow-tea-taro's
  TextWorld reports cumulative scores); the engine converts cumulative scores to increments. ``info`` may
  carry ``role`` (the chat role of the observation: "user" or "tool"), ``tool_calls`` (calls executed),
  ``format_errors`` (unparsable or rejected calls), ``invalid`` (an action the environment could not use);
* ``max_total_reward()`` (the normaliser of dense rewards) and ``success()`` (the exact success check);
* ``replay(actions)``: deterministic re-execution from the last reset, returning ``(observation, done,
  total reward)``, for resumable rollouts and for checking a stored trajectory.

Environments also supply their task rows (``task_rows(split, n, seed)``): the ``environment`` task
(environments/tasks.py) builds train and held-out splits from them, so a recipe names the environment once.
"""

from __future__ import annotations

from typing import Any, Literal

RewardMode = Literal["cumulative", "incremental"]
REWARD_MODES = ("cumulative", "incremental")


class EnvironmentContractError(RuntimeError):
    """An environment used against its contract (step before reset, a bad reward mode, ...)."""


class Environment:
    """Base class of a D0 environment. Subclasses set ``reward_mode`` and implement ``_reset``/``_step``.

    The base keeps the episode's actions, so ``replay`` re-runs them from the reset that started the
    episode; ``step`` after ``done`` is a contract error, not a silent no-op.
    """

    reward_mode: RewardMode = "incremental"
    # text the engine puts in front of the first user message (the tools' schemas, the game's rules)
    instructions: str = ""

    def __init__(self):
        self._row: dict | None = None
        self._seed: int = 0
        self._actions: list[str] = []
        self._done = False

    # -- the D0 calls ----------------------------------------------------------------------------
    def reset(self, task_row: dict, seed: int) -> str:
        if self.reward_mode not in REWARD_MODES:
            raise EnvironmentContractError(f"{type(self).__name__}.reward_mode must be one of {REWARD_MODES}, "
                                    f"got {self.reward_mode!r}")
        self._row, self._seed, self._actions, self._done = dict(task_row), int(seed), [], False
        return self._reset(self._row, self._seed)

    def step(self, action: str) -> tuple[str, bool, float, dict[str, Any]]:
        if self._row is None:
            raise EnvironmentContractError(f"{type(self).__name__}.step() before reset()")
        if self._done:
            raise EnvironmentContractError(f"{type(self).__name__}.step() after the episode ended")
        self._actions.append(action)
        observation, done, reward, info = self._step(action)
        self._done = bool(done)
        return str(observation), bool(done), float(reward), dict(info or {})

    def replay(self, actions: list[str]) -> tuple[str, bool, float]:
        """Re-run ``actions`` from the episode's reset; (last observation, done, total reward)."""
        if self._row is None:
            raise EnvironmentContractError(f"{type(self).__name__}.replay() before reset()")
        observation = self.reset(self._row, self._seed)
        done, total = False, 0.0
        for action in actions:
            if done:
                break
            observation, done, reward, _ = self.step(action)
            total = reward if self.reward_mode == "cumulative" else total + reward
        return observation, done, total

    def max_total_reward(self) -> float:
        return 1.0

    def success(self) -> bool:
        """The exact success check of the episode so far (False unless the subclass says otherwise)."""
        return False

    @property
    def actions(self) -> list[str]:
        return list(self._actions)

    # -- what subclasses implement ---------------------------------------------------------------
    def _reset(self, row: dict, seed: int) -> str:
        raise NotImplementedError

    def _step(self, action: str) -> tuple[str, bool, float, dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def task_rows(cls, split: str, n: int, seed: int, **params) -> list[dict]:
        """``n`` task rows of ``split`` ("train" or "eval"; disjoint); each has ``prompt``."""
        raise NotImplementedError(f"{cls.__name__} does not generate task rows; give the task rows yourself")


def increments(rewards: list[float], mode: str) -> list[float]:
    """Per-turn reward increments Delta_k from what ``step`` returned: a cumulative score becomes its
    differences (Delta_k = R_k - R_{k-1}, R_0 = 0; meow-tea-taro converts TextWorld's scores this way);
    incremental rewards are already increments."""
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    if mode == "incremental":
        return [float(r) for r in rewards]
    out, previous = [], 0.0
    for r in rewards:
        out.append(float(r) - previous)
        previous = float(r)
    return out
