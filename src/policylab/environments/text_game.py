"""A seeded text game (the TextWorld-style setting of data_agents_eval.md D1): rooms joined by exits, objects
lying about, one goal "put the <object> in the <room>", a known optimal solution length.

The map is a random tree over ``rooms`` rooms (exits north/south/east/west, each room at a grid point);
``objects`` objects, one of them the goal object. Commands: ``go <direction>``, ``take <object>``,
``drop <object>``, ``look``, ``inventory``; anything else is an invalid action ("I don't understand", no
score, counted). The score is cumulative (like TextWorld's): +1 the first time the goal object is taken,
+1 when it is dropped in the goal room (which wins and ends the game), so ``max_total_reward`` = 2. The
optimal solution length is the shortest path to the object + 1 (take) + the shortest path to the goal
room + 1 (drop), computed by breadth-first search. Train and held-out games use disjoint seeds.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Literal

from policylab.environments.base import Environment
from policylab.registry import register

ROOM_NAMES = ("kitchen", "hall", "garden", "cellar", "attic", "library", "study", "pantry", "porch", "bedroom",
              "bathroom", "garage", "office", "studio", "gallery", "shed")
OBJECT_NAMES = ("key", "apple", "coin", "lamp", "book", "cup", "ring", "map", "rope", "bell", "box", "pen")
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def build_world(seed: int, rooms: int, objects: int) -> dict:
    """The game of ``seed``: rooms on grid points joined as a random tree, objects placed, a goal."""
    if not 1 <= rooms <= len(ROOM_NAMES) or not 1 <= objects <= len(OBJECT_NAMES):
        raise ValueError(f"text_game needs 1..{len(ROOM_NAMES)} rooms and 1..{len(OBJECT_NAMES)} objects")
    rng = random.Random(f"text_game/{seed}/{rooms}/{objects}")
    names = rng.sample(ROOM_NAMES, rooms)
    where = {names[0]: (0, 0)}
    exits: dict[str, dict[str, str]] = {names[0]: {}}
    for name in names[1:]:
        while True:  # attach to a random placed room through a free grid neighbour
            base = rng.choice(sorted(where))
            direction = rng.choice(sorted(DIRECTIONS))
            dx, dy = DIRECTIONS[direction]
            point = (where[base][0] + dx, where[base][1] + dy)
            if point not in where.values():
                break
        where[name] = point
        exits[name] = {OPPOSITE[direction]: base}
        exits[base][direction] = name
    things = rng.sample(OBJECT_NAMES, objects)
    placed = {thing: rng.choice(names) for thing in things}
    start, goal_object = names[0], things[0]
    goal_room = rng.choice([n for n in names if n != placed[goal_object]] or names)
    return {"exits": exits, "objects": placed, "start": start, "goal_object": goal_object, "goal_room": goal_room}


def shortest_path(exits: dict, a: str, b: str) -> int:
    frontier, seen = deque([(a, 0)]), {a}
    while frontier:
        room, d = frontier.popleft()
        if room == b:
            return d
        for nxt in exits[room].values():
            if nxt not in seen:
                seen.add(nxt)
                frontier.append((nxt, d + 1))
    raise ValueError(f"rooms {a!r} and {b!r} are not connected")


def optimal_length(world: dict) -> int:
    """Moves of the shortest winning command sequence."""
    obj_room = world["objects"][world["goal_object"]]
    take = shortest_path(world["exits"], world["start"], obj_room) + 1
    if obj_room == world["goal_room"]:
        return take + 1  # take it and drop it where it lies
    return take + shortest_path(world["exits"], obj_room, world["goal_room"]) + 1


def walkthrough(world: dict) -> list[str]:
    """One optimal command sequence (for SFT data and for tests)."""
    def path(a, b):
        parent, frontier = {a: None}, deque([a])
        while frontier:
            room = frontier.popleft()
            for d, nxt in sorted(world["exits"][room].items()):
                if nxt not in parent:
                    parent[nxt] = (room, d)
                    frontier.append(nxt)
        steps, room = [], b
        while parent[room] is not None:
            room, d = parent[room]
            steps.append(f"go {d}")
        return steps[::-1]

    obj = world["goal_object"]
    obj_room = world["objects"][obj]
    return path(world["start"], obj_room) + [f"take {obj}"] + path(obj_room, world["goal_room"]) + [f"drop {obj}"]


@register("environment", "text_game", spec="data_agents_eval.md D1 (TextWorld-style game, sizes that scale)")
class TextGame(Environment):
    """Rooms, objects and a goal from a seed; cumulative score (take the goal object +1, drop it in the goal
    room +1 and win); ``rooms``/``objects`` scale the game."""

    reward_mode = "cumulative"
    INSTRUCTIONS = {"full": "You play a text game. Reply with exactly one command per turn: go north/south/east/west, "
                            "take <object>, drop <object>, look, inventory.",
                    "brief": "Commands: go <dir>, take <x>, drop <x>."}  # for small contexts (the tiny test model)

    def __init__(self, rooms: int = 2, objects: int = 1, prompt_style: Literal["full", "brief"] = "full"):
        super().__init__()
        self.rooms, self.objects = rooms, objects
        self.instructions = self.INSTRUCTIONS[prompt_style]
        build_world(0, rooms, objects)  # bad sizes fail when the recipe is built, not mid-run

    def _reset(self, row: dict, seed: int) -> str:
        self.world = build_world(int(row["game_seed"]), int(row.get("rooms", self.rooms)),
                                 int(row.get("objects", self.objects)))
        self.room = self.world["start"]
        self.lying = dict(self.world["objects"])  # object -> room, or None when carried
        self.score = 0
        self.took_goal = False
        self.won = False
        return self.describe()

    def describe(self) -> str:
        here = sorted(o for o, r in self.lying.items() if r == self.room)
        exits = ", ".join(sorted(self.world["exits"][self.room]))
        seen = f" You see: {', '.join(here)}." if here else ""
        return f"You are in the {self.room}. Exits: {exits}.{seen}"

    def _step(self, action: str):
        words = action.strip().lower().rstrip(".!").split()
        verb, arg = (words[0], " ".join(words[1:])) if words else ("", "")
        if verb == "go" and arg in self.world["exits"][self.room]:
            self.room = self.world["exits"][self.room][arg]
            return self.describe(), False, self.score, {}
        if verb == "take" and self.lying.get(arg, "") == self.room:
            self.lying[arg] = None
            if arg == self.world["goal_object"] and not self.took_goal:
                self.took_goal, self.score = True, self.score + 1
            return f"You take the {arg}.", False, self.score, {}
        if verb == "drop" and arg in self.lying and self.lying[arg] is None:
            self.lying[arg] = self.room
            if arg == self.world["goal_object"] and self.room == self.world["goal_room"]:
                self.score, self.won = self.score + 1, True
                return f"You drop the {arg}. You win!", True, self.score, {}
            return f"You drop the {arg}.", False, self.score, {}
        if verb == "look" and not arg:
            return self.describe(), False, self.score, {}
        if verb == "inventory" and not arg:
            held = sorted(o for o, r in self.lying.items() if r is None)
            return ("You carry: " + ", ".join(held) + ".") if held else "You carry nothing.", False, self.score, {}
        return "I don't understand that.", False, self.score, {"invalid": True}

    def max_total_reward(self) -> float:
        return 2.0

    def success(self) -> bool:
        return self.won

    def task_rows(self, split: str, n: int, seed: int) -> list[dict]:
        """Train games use seeds seed*100003 + 2k, held-out games + 2k + 1 (disjoint)."""
        offset = 0 if split == "train" else 1
        rows = []
        for k in range(n):
            game_seed = seed * 100003 + 2 * k + offset
            world = build_world(game_seed, self.rooms, self.objects)
            rows.append({"prompt": f"Goal: put the {world['goal_object']} in the {world['goal_room']}.",
                         "game_seed": game_seed, "rooms": self.rooms, "objects": self.objects,
                         "answer": optimal_length(world), "optimal_length": optimal_length(world)})
        return rows
