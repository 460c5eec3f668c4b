"""Real TextWorld games (the optional ``textworld`` extra: ``pip install 'policylab[textworld]'``), the
environment of data_agents_eval.md D1's practitioner's guide: ``tw-make custom --world-size W --nb-objects O
--quest-length Q --seed S`` generates a game offline (TextWorld ships Inform 7), ``textworld.start`` plays it
with the admissible commands, the max score and the optimal walkthrough (``policy_commands``), whose length
is the optimal solution length. Scores are cumulative; success is TextWorld's ``won``. Generated games are
cached under ``~/.cache/policylab/textworld`` (one file per size and seed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from policylab.environments.base import Environment
from policylab.registry import register


def _tw_make() -> str:
    found = shutil.which("tw-make") or str(Path(sys.executable).with_name("tw-make"))
    if not Path(found).exists():
        raise ImportError("textworld_game needs the textworld package (pip install 'policylab[textworld]'), "
                          "whose tw-make command generates the games")
    return found


def game_file(world_size: int, nb_objects: int, quest_length: int, seed: int) -> Path:
    """The generated game for these sizes and seed (made once with tw-make, then cached)."""
    root = Path(os.environ.get("POLICYLAB_CACHE", Path.home() / ".cache" / "policylab")) / "textworld"
    path = root / f"w{world_size}-o{nb_objects}-q{quest_length}-s{seed}.z8"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.z8")
        proc = subprocess.run([_tw_make(), "custom", "--world-size", str(world_size), "--nb-objects", str(nb_objects),
                               "--quest-length", str(quest_length), "--seed", str(seed), "--output", str(tmp), "-f"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not tmp.exists():
            raise RuntimeError(f"tw-make failed for {path.name}: {proc.stderr.strip()[-500:]}")
        for extra in tmp.parent.glob(tmp.stem + ".*"):  # the game and its .json/.ni companions
            extra.replace(path.with_suffix(extra.suffix))
    return path


@register("environment", "textworld_game", spec="data_agents_eval.md D1 (TextWorld w-o-q games, meow-tea-taro)")
class TextWorldGame(Environment):
    """A TextWorld game of ``world_size`` rooms, ``nb_objects`` objects and a quest of ``quest_length`` steps;
    cumulative score, success = won, optimal length = the walkthrough's length."""

    reward_mode = "cumulative"
    instructions = "You play a text adventure. Reply with exactly one command per turn."

    def __init__(self, world_size: int = 2, nb_objects: int = 3, quest_length: int = 2):
        super().__init__()
        self.sizes = (world_size, nb_objects, quest_length)
        self.env = None

    def _start(self, seed: int):
        import textworld

        infos = textworld.EnvInfos(admissible_commands=True, max_score=True, policy_commands=True, won=True,
                                   description=True, objective=True)
        if self.env is not None:
            self.env.close()
        self.env = textworld.start(str(game_file(*self.sizes, seed)), request_infos=infos)
        return self.env.reset()

    def _reset(self, row: dict, seed: int) -> str:
        state = self._start(int(row["game_seed"]))
        self.max_score, self.won = float(state["max_score"]), False
        self.admissible = list(state["admissible_commands"] or [])
        return f"{state['objective'].strip()}\n{state['description'].strip()}"

    def _step(self, action: str):
        command = action.strip().splitlines()[0].strip().lower() if action.strip() else ""
        invalid = command not in self.admissible
        state, score, done = self.env.step(command)
        self.won = bool(state["won"])
        self.admissible = list(state["admissible_commands"] or [])
        return state.feedback.strip(), bool(done), float(score), {"invalid": invalid}

    def max_total_reward(self) -> float:
        return self.max_score

    def success(self) -> bool:
        return self.won

    def task_rows(self, split: str, n: int, seed: int) -> list[dict]:
        """Train games use seeds seed*100003 + 2k, held-out games + 2k + 1 (disjoint); generating one takes
        about 3 s the first time."""
        offset = 0 if split == "train" else 1
        rows = []
        for k in range(n):
            game_seed = seed * 100003 + 2 * k + offset
            state = self._start(game_seed)
            walkthrough = list(state["policy_commands"])
            rows.append({"prompt": "Win the game.", "game_seed": game_seed, "answer": len(walkthrough),
                         "optimal_length": len(walkthrough), "walkthrough": walkthrough})
        return rows
