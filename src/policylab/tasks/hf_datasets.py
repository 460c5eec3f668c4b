"""Tasks from Hugging Face ``datasets``: a folder written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk``, a folder of data files ``datasets.load_dataset`` reads (jsonl, json, parquet,
csv, arrow), or a hub id ``owner/name`` when the hub is reachable (or the dataset is cached).

Columns: ``prompt`` (a string, or TRL's conversational list of ``{role, content}`` messages; another column
with ``prompt_column``) and the answer: ``answer``, else ``solution`` (TRL's GRPO examples and open-r1),
else ``ground_truth``; another with ``answer_column``. The original columns stay in the row, so rewards
(a TRL-style ``fn(prompts, completions, solution, **kwargs)`` included) see them under their own names.

Splits: ``train`` is trained on; ``eval_split``, else ``test``, else ``validation``, else a seeded held-out
fraction of train, is the eval split. Bad rows are errors naming the dataset, the split, the row and the
column. ``datasets`` is imported only when such a task is built, so ``import policylab`` stays light.

The hub helpers (offline detection, cached snapshots, nearby folder names) live here, on the tasks floor,
because model loading (models/, a higher floor) needs the same fast offline answer.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

from policylab.registry import register
from policylab.tasks import Task
from policylab.tasks.files import DatasetError, _check_row, split_rows

ANSWER_COLUMNS = ("answer", "solution", "ground_truth")
PROMPT_CANDIDATES = ("prompt", "question", "problem", "query", "instruction", "input", "messages")
EVAL_SPLITS = ("test", "validation")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")

# ----------------------------------------------------------------------------------------------
# hub names and reachability (shared with models/)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # owner/name, one slash
_TRUE = ("1", "true", "yes", "on")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name))


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def hub_offline(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached now (an offline variable set, or no connection within ``timeout`` s), or
    None. transformers and datasets retry an unreachable hub for about a minute before failing; one
    connection attempt here turns that into an immediate, clear error."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def probe():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(f"{host} cannot be reached: {err}")

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return result[0] if result else f"{host} did not answer within {timeout:.0f} s"


def cached_hub_snapshot(repo_id: str, repo_type: str = "model") -> str | None:
    """The local snapshot folder of a hub repository already in the Hugging Face cache, or None."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or an unusable cache entry
        return None


def nearby_paths(path: Path, suffix: str | None = None, limit: int = 3) -> list[str]:
    """Existing siblings whose names are close to ``path``'s: folders, or files ending in ``suffix``."""
    try:
        siblings = [p for p in path.parent.iterdir() if (p.is_file() and p.name.endswith(suffix) if suffix else p.is_dir())]
    except OSError:
        return []
    names = {p.name: p for p in siblings}
    return [str(names[c]) for c in difflib.get_close_matches(path.name, list(names), n=limit, cutoff=0.5)]


def did_you_mean(options: list[str]) -> str:
    return " (did you mean " + " or ".join(repr(o) for o in options) + "?)" if options else ""


# ----------------------------------------------------------------------------------------------
# --task NAME -> task component


def task_for_name(name: str, registered: list[str]) -> dict[str, Any] | None:
    """The task component a ``--task``/``task.name`` value stands for, or None to use it as a registered name:
    a data file -> ``file``, a folder, hub id or path -> ``hf_dataset``. Registered names win over folders.
    A file or folder that exists is recorded absolute, so ``--resume`` and ``policylab eval`` find it from
    any working directory (as reward files, config.py)."""
    if name in registered:
        return None
    local = Path(name).expanduser()
    path = os.path.abspath(local) if local.exists() else name
    if name.endswith((".jsonl", ".parquet", ".json")):
        return {"name": "file", "path": path}
    if local.is_dir() or looks_like_hub_id(name) or looks_like_path(name):
        return {"name": "hf_dataset", "path": path}
    return None


# ----------------------------------------------------------------------------------------------
# loading


def open_dataset(path: str, config: str | None = None):
    """A ``datasets.Dataset`` or ``DatasetDict`` for ``path`` (see the module docstring), or a DatasetError
    naming what is missing: the folder (with nearby names), readable files, or the hub while offline."""
    import datasets

    datasets.disable_progress_bars()  # per-shard bars would drown the run's own output
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                return datasets.load_from_disk(str(p))
            if not any(f.suffix in DATA_FILE_SUFFIXES for f in p.rglob("*") if f.is_file()):
                raise DatasetError(f"dataset folder {p} holds neither a saved dataset (save_to_disk) nor data files "
                                   f"({', '.join(DATA_FILE_SUFFIXES)})")
            return datasets.load_dataset(str(p), config)
        if p.is_file():
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
            if p.suffix not in builder:
                raise DatasetError(f"dataset file {p}: unsupported extension {p.suffix!r} ({', '.join(builder)})")
            return datasets.load_dataset(builder[p.suffix], data_files=str(p))
        if looks_like_hub_id(path) and not looks_like_path(path):
            offline = hub_offline()
            if offline is None:
                return datasets.load_dataset(path, config)
            snapshot = cached_hub_snapshot(path, "dataset")
            if snapshot is not None:  # a cached copy loads from disk, without the hub's retries
                return datasets.load_dataset(snapshot, config)
            local = nearby_paths(p) if p.parent.is_dir() else []
            raise DatasetError(f"dataset {path!r} looks like a hub id, but the hub is offline ({offline}) and it is "
                               "not in the Hugging Face cache; download it while online, or pass a local folder or "
                               "file" + did_you_mean(local))
    except DatasetError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, DatasetNotFoundError)
        raise DatasetError(f"dataset {path!r} cannot be loaded: {type(err).__name__}: {err}") from None
    raise DatasetError(f"dataset folder {p} does not exist" + did_you_mean(nearby_paths(p))
                       + "; a task is a registered name, a .jsonl/.parquet file, a dataset folder or a hub id owner/name")


def _answer_column(columns: list[str], answer_column: str | None, where: str) -> str | None:
    if answer_column is not None:
        if answer_column not in columns:
            raise DatasetError(f"{where} has no column {answer_column!r} (task.answer_column)"
                               + did_you_mean(difflib.get_close_matches(answer_column, columns, n=2)) + f"; columns: {columns}")
        return answer_column
    return next((c for c in ANSWER_COLUMNS if c in columns), None)


def dataset_rows(ds, where: str, prompt_column: str = "prompt", answer_column: str | None = None) -> list[dict]:
    """Task rows of one split: ``prompt`` and ``answer`` (a string) set, every original column kept."""
    columns = list(ds.column_names)
    if prompt_column not in columns:
        close = difflib.get_close_matches(prompt_column, columns, n=2) + [c for c in PROMPT_CANDIDATES if c in columns]
        hint = f"; set task.prompt_column={close[0]}" if close else ""
        raise DatasetError(f"{where} has no column {prompt_column!r} (columns: {columns}){hint}")
    answer = _answer_column(columns, answer_column, where)
    rows = []
    for i, record in enumerate(ds):
        row = dict(record)
        row["prompt"] = row[prompt_column]
        if answer is not None:
            if row[answer] is None:
                raise DatasetError(f"{where} row {i}: column {answer!r} is empty")
            row["answer"] = str(row[answer])
        else:
            row.setdefault("answer", None)  # a reward that needs no answer (a TRL format reward) still works
        rows.append(_check_row(row, f"{where} row {i} (prompt column {prompt_column!r})", require_answer=False))
    if not rows:
        raise DatasetError(f"{where} has no rows")
    return rows


@register("task", "hf_dataset", spec="issue 13 §6 (bring your own data); foundation issue §4")
def hf_dataset_task(*, path: str, split: str = "train", eval_split: str | None = None, prompt_column: str = "prompt",
                    answer_column: str | None = None, config: str | None = None, eval_fraction: float = 0.1,
                    seed: int = 0) -> Task:
    """A Hugging Face dataset: a save_to_disk folder, a folder of data files, or a hub id (see the module doc)."""
    import datasets

    loaded = open_dataset(path, config)
    name = Path(path).name or path
    if isinstance(loaded, datasets.Dataset):  # one split saved alone: the held-out fraction is the eval split
        if eval_split:
            raise DatasetError(f"dataset {path!r} is a single split (no {eval_split!r}); drop task.eval_split")
        train = dataset_rows(loaded, f"dataset {path!r}", prompt_column, answer_column)
        train, evaluation = split_rows(train, eval_fraction, seed)
        return Task(name, train=train, eval=evaluation)
    splits = list(loaded)
    for wanted in (split, eval_split):
        if wanted is not None and wanted not in splits:
            raise DatasetError(f"dataset {path!r} has no split {wanted!r}" + did_you_mean(difflib.get_close_matches(wanted, splits, n=2))
                               + f"; splits: {splits}")
    train = dataset_rows(loaded[split], f"dataset {path!r} split {split!r}", prompt_column, answer_column)
    held_out = eval_split or next((s for s in EVAL_SPLITS if s in splits and s != split), None)
    if held_out is None:
        train, evaluation = split_rows(train, eval_fraction, seed)
    else:
        evaluation = dataset_rows(loaded[held_out], f"dataset {path!r} split {held_out!r}", prompt_column, answer_column)
    return Task(name, train=train, eval=evaluation)
