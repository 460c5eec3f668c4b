"""Real TextWorld games through the optional textworld extra (skipped without it)."""

import pytest

pytest.importorskip("textworld")

from policylab.environments.base import increments  # noqa: E402
from policylab.environments.tasks import build_environment  # noqa: E402


@pytest.mark.slow
def test_textworld_walkthrough_wins_with_cumulative_score(tmp_path, monkeypatch):
    monkeypatch.setenv("POLICYLAB_CACHE", str(tmp_path))
    env = build_environment("textworld_game", {"world_size": 2, "nb_objects": 3, "quest_length": 2})
    row = env.task_rows("train", 1, seed=0)[0]
    assert row["optimal_length"] == len(row["walkthrough"]) >= 1
    first = env.reset(row, 0)
    assert first
    assert env.step("dance on the ceiling")[3]["invalid"]
    env.reset(row, 0)
    scores, done = [], False
    for command in row["walkthrough"]:
        _, done, score, info = env.step(command)
        scores.append(score)
        assert not info["invalid"]
    assert done and env.success() and scores[-1] == env.max_total_reward()
    assert sum(increments(scores, "cumulative")) == env.max_total_reward()
    assert env.replay(row["walkthrough"])[1:] == (True, env.max_total_reward())
