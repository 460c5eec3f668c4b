"""Your own reward: a plain Python function, given as a callable (``policylab.train(reward_funcs=[fn])``) or
as an import path (``my_rewards.py:score``, ``package.module:fn``) in a recipe, an override or ``--reward``.

Two signatures are accepted, told apart by their parameter names:

- TRL's (GRPOTrainer ``reward_funcs``): ``fn(prompts, completions, **kwargs) -> list[float | None]``, called
  once per batch with keywords. ``prompts`` are the dataset prompts as written (a string, or a list of
  ``{role, content}`` messages); ``completions`` are strings, or ``[{"role": "assistant", "content": ...}]``
  for a conversational prompt, as TRL passes them; every other row column (``answer``, ``solution``, ...)
  arrives as a keyword holding one value per completion. Not passed: ``completion_ids`` and
  ``trainer_state`` (the combiner sees texts only). A function without ``**kwargs`` gets only the columns it names.
- policylab's (a registered reward's): ``fn(prompt, completion, row) -> float | None`` per completion, where
  ``prompt`` is the formatted text the model saw.

``None`` (or a raise, or NaN) marks that completion's reward as failed, as in TRL and rewards/combine.py.

Import paths: a file path (ends in ``.py`` or holds a ``/``) is loaded as a module of its own; a relative
file path is made absolute against the working directory when the recipe loads (config.py), so
``config.yaml`` names the same file for ``--resume`` and ``policylab eval`` from any directory (a moved file
is an error naming the recorded path). A module path is imported from ``sys.path``, then from the working
directory. A callable passed to ``train()`` is recorded as ``module:qualname``; a lambda, a local function,
or a function of ``__main__`` cannot be imported again, so ``train()`` warns at the start and a resume or
eval that does not pass it again fails naming it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

from policylab.registry import register


class RewardImportError(ValueError):
    """A reward import path that does not resolve; the message names the path and what is missing."""


SIGNATURES = ("TRL's fn(prompts, completions, **kwargs) -> list[float | None], or policylab's "
              "fn(prompt, completion, row) -> float | None")

# callables handed to policylab.train(reward_funcs=...) in this process, by their recorded path: they are
# used as given (no re-import) while that train() call runs
_PASSED: dict[str, Callable] = {}
_FILE_MODULES: dict[tuple[str, int, int], ModuleType] = {}
_MODULE_FILES: dict[str, str] = {}  # module name we gave a loaded file -> the file


def split_path(path: str) -> tuple[str, str]:
    """'dir/x.py:fn' -> ('dir/x.py', 'fn'); the last ':' separates, so 'C:\\x.py:fn' works too."""
    target, sep, qualname = str(path).rpartition(":")
    if not sep or not target or not qualname:
        raise RewardImportError(f"reward {path!r} must look like file.py:function or package.module:function")
    return target, qualname


def is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


@contextmanager
def passed_callables(mapping: dict[str, Callable]) -> Iterator[None]:
    """Make ``mapping`` (path -> callable) resolvable for the duration of one train() call."""
    saved = {k: _PASSED[k] for k in mapping if k in _PASSED}
    _PASSED.update(mapping)
    try:
        yield
    finally:
        for k in mapping:
            _PASSED.pop(k, None)
        _PASSED.update(saved)


def _load_file(file: Path, path: str) -> ModuleType:
    if not file.is_file():
        raise RewardImportError(f"reward {path!r}: file {file} does not exist")
    stat = file.stat()
    key = (str(file), stat.st_mtime_ns, stat.st_size)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    name = f"policylab_user_rewards.{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing inside the file look themselves up here
    if str(file.parent) not in sys.path:  # as when the file runs as a script: it may import its neighbours
        sys.path.append(str(file.parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        sys.modules.pop(name, None)
        raise RewardImportError(f"reward {path!r}: file {file} has a syntax error at line {err.lineno}: {err.msg}") from None
    except Exception as err:
        sys.modules.pop(name, None)
        raise RewardImportError(f"reward {path!r}: importing {file} raised {type(err).__name__}: {err}") from None
    _FILE_MODULES[key] = module
    _MODULE_FILES[name] = str(file)
    return module


def _import_module(target: str, path: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        missing = err.name or target
        if not target.startswith(missing) or os.getcwd() in sys.path:
            raise RewardImportError(f"reward {path!r}: importing {target!r} failed: no module named {missing!r}") from None
    except Exception as err:
        raise RewardImportError(f"reward {path!r}: importing {target!r} raised {type(err).__name__}: {err}") from None
    sys.path.append(os.getcwd())  # `python -m` would have found a module of the working directory
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        raise RewardImportError(f"reward {path!r}: no module named {err.name or target!r} (looked in sys.path and "
                                f"the working directory {os.getcwd()})") from None
    except Exception as err:
        raise RewardImportError(f"reward {path!r}: importing {target!r} raised {type(err).__name__}: {err}") from None
    finally:
        sys.path.remove(os.getcwd())


def resolve(path: str) -> Callable:
    """The function an import path names (see the module docstring), or a RewardImportError naming what is missing."""
    if path in _PASSED:
        return _PASSED[path]
    target, qualname = split_path(path)
    if "<" in qualname or target == "__main__":
        raise RewardImportError(
            f"reward {path!r} was a Python callable (a lambda, a local function or a function of the script that "
            "started the run) and cannot be imported again; pass it again, e.g. policylab.train(..., resume=True, "
            "reward_funcs=[fn]), or move it to a module and name it as file.py:function")
    module = _load_file(Path(target).expanduser(), path) if is_file_target(target) else _import_module(target, path)
    obj: Any = module
    for i, part in enumerate(qualname.split(".")):
        if not hasattr(obj, part):
            where = ".".join(qualname.split(".")[:i]) or getattr(module, "__file__", target)
            options = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, options, n=3, cutoff=0.5)
            hint = " (did you mean " + " or ".join(repr(c) for c in close) + "?)" if close else \
                (f" (its functions: {', '.join(options[:10])})" if options else "")
            raise RewardImportError(f"reward {path!r}: {where} has no {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardImportError(f"reward {path!r} is a {type(obj).__name__}, not a function")
    return obj


def callable_path(fn: Callable) -> tuple[str, bool]:
    """(the path config.yaml records for ``fn``, whether a later process can import it from there)."""
    if not callable(fn):
        raise TypeError(f"reward_funcs entries must be callables or import paths, got {type(fn).__name__}")
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or f"<{type(fn).__qualname__} instance>"
    if module in _MODULE_FILES:  # a function of a reward file we loaded: record the file, not our module name
        return f"{_MODULE_FILES[module]}:{qualname}", True
    path = f"{module}:{qualname}"
    if module == "__main__" or "<" in qualname:
        return path, False
    try:
        return path, resolve(path) is fn
    except RewardImportError:
        return path, False


def reward_entries(funcs: Sequence[Callable | str], weights: Sequence[float] | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, Callable]]:
    """Recipe ``rewards`` entries for ``train(reward_funcs=..., reward_weights=...)`` and the callables to keep
    resolvable while it runs; warns for each callable a resume or eval will need passed again."""
    if isinstance(funcs, (str, bytes)) or callable(funcs):
        funcs = [funcs]
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} values but reward_funcs has {len(funcs)} functions")
    entries, passed = [], {}
    for i, fn in enumerate(funcs):
        if isinstance(fn, str):
            path = fn
        else:
            path, importable = callable_path(fn)
            if path in passed and passed[path] is not fn:  # two lambdas of one scope share a qualname
                path = f"{path}[{i}]"
            passed[path] = fn
            if not importable:
                warnings.warn(f"reward_funcs[{i}] ({getattr(fn, '__name__', fn)!r}) cannot be imported again (a lambda, "
                              f"a local function or a function of __main__): config.yaml records {path!r}, so --resume "
                              "and `policylab eval` will need it passed again (reward_funcs=[...]); define it at module "
                              "level in a file to avoid this", UserWarning, stacklevel=3)
        entry = {"name": "python", "path": path}
        if weights is not None:
            entry["weight"] = float(weights[i])
        entries.append(entry)
    return entries, passed


def check_user_rewards(specs) -> None:
    """Resolve every user reward of a recipe's ``rewards`` now (cheap: imports only), so a missing file,
    function or bad signature fails before the task and the model load; other rewards build later."""
    for i, spec in enumerate(specs):
        if spec.name == "python":
            try:
                PythonReward(**{k: v for k, v in spec.params.items() if k != "weight"})
            except RewardImportError as err:
                raise RewardImportError(f"rewards.{i}: {err}") from None


def _number(value: Any) -> float:
    if value is None or isinstance(value, (str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@register("reward", "python", spec="TRL GRPOTrainer reward_funcs (a user function); issue 13 §6")
class PythonReward:
    """Your function, named by an import path (file.py:fn or package.module:fn); TRL's or policylab's signature."""

    batched = True  # rewards/combine.py calls score_batch once per batch

    def __init__(self, path: str):
        self.path = path
        self.fn = resolve(path)
        self.reward_name = split_path(path)[1].split(".")[-1].split("[")[0]
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # a builtin or C callable: assume TRL's keyword call
            params = {}
        self.takes_any_keyword = not params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.keywords = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if "completions" in params or "prompts" in params or (self.takes_any_keyword and "completion" not in params):
            self.style = "trl"
        elif "completion" in params or len([p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3:
            self.style = "policylab"
        else:
            raise RewardImportError(f"reward {path!r} has the signature {self.reward_name}{inspect.signature(self.fn)}; "
                                    f"expected {SIGNATURES}")

    def score_batch(self, prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        """One value per completion (NaN for None or a non-number); raises on a wrong-length result."""
        if self.style == "policylab":
            return [_number(self.fn(p, c, r)) for p, c, r in zip(prompts, completions, rows)]
        raw_prompts = [row.get("prompt", p) for p, row in zip(prompts, rows)]
        kwargs: dict[str, Any] = {
            "prompts": raw_prompts,
            "completions": [[{"role": "assistant", "content": c}] if isinstance(rp, list) else c
                            for rp, c in zip(raw_prompts, completions)],
        }
        for column in dict.fromkeys(k for row in rows for k in row if k not in ("prompt", "completion", "completion_ids")):
            kwargs[column] = [row.get(column) for row in rows]
        if not self.takes_any_keyword:
            kwargs = {k: v for k, v in kwargs.items() if k in self.keywords}
        values = self.fn(**kwargs)
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != len(completions):
            got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
            raise ValueError(f"reward {self.path!r} returned {got} for {len(completions)} completions "
                             "(a TRL-style reward returns one float or None per completion)")
        return [_number(v) for v in values]

    def __call__(self, prompt: str, completion: str, row: dict) -> float | None:
        """One completion: the per-sample reward interface (policylab eval, judges of single samples)."""
        value = self.score_batch([prompt], [completion], [row])[0]
        return None if math.isnan(value) else value
