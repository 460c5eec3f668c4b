"""Tasks from files: jsonl and parquet with columns prompt, answer, optional system (+ extras);
HF datasets when the `datasets` package is installed. Errors name the file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from policylab.registry import register
from policylab.tasks import Task


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and line/row."""


def _check_row(row: Any, where: str, require_answer: bool) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise DatasetError(f"{where}: missing or empty 'prompt'")
    if require_answer and row.get("answer") is None:
        raise DatasetError(f"{where}: missing 'answer'")
    if "system" in row and row["system"] is not None and not isinstance(row["system"], str):
        raise DatasetError(f"{where}: 'system' must be a string")
    return row


def read_jsonl(path: Path, require_answer: bool = True) -> list[dict]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"dataset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"dataset file {path} cannot be read: {err}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        rows.append(_check_row(row, f"{path}:{lineno}", require_answer))
    return rows


def read_parquet(path: Path, require_answer: bool = True) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow is a core dependency
        raise DatasetError("reading parquet needs pyarrow") from err
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"dataset file {path} is not readable parquet: {err}") from None
    return [_check_row(r, f"{path} row {i}", require_answer) for i, r in enumerate(table.to_pylist())]


def read_rows(path: str | Path, require_answer: bool = True) -> list[dict]:
    path = Path(path)
    if path.suffix == ".jsonl" or path.suffix == ".json":
        rows = read_jsonl(path, require_answer)
    elif path.suffix == ".parquet":
        rows = read_parquet(path, require_answer)
    else:
        raise DatasetError(f"dataset file {path}: unsupported extension {path.suffix!r} (use .jsonl or .parquet)")
    if not rows:
        raise DatasetError(f"dataset file {path} has no rows")
    for r in rows:
        r["answer"] = None if r.get("answer") is None else str(r["answer"])
    return rows


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(rows) * eval_fraction)) if len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


@register("task", "file", spec="foundation issue §4")
def file_task(*, path: str, eval_path: str | None = None, eval_fraction: float = 0.1, seed: int = 0) -> Task:
    """Rows from a .jsonl or .parquet file; eval split from ``eval_path`` or a seeded held-out fraction."""
    rows = read_rows(path)
    if eval_path:
        train, evaluation = rows, read_rows(eval_path)
    else:
        train, evaluation = split_rows(rows, eval_fraction, seed)
    return Task(Path(path).stem, train=train, eval=evaluation)


@register("task", "hf_dataset", spec="foundation issue §4")
def hf_dataset_task(*, path: str, split: str = "train", eval_split: str | None = None, prompt_column: str = "prompt",
                    answer_column: str = "answer", config: str | None = None, eval_fraction: float = 0.1, seed: int = 0) -> Task:
    """A Hugging Face dataset (needs the optional `datasets` package and a local copy or hub access)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError("task hf_dataset needs the `datasets` package: pip install datasets") from None

    def load(split_name):
        ds = datasets.load_dataset(path, config, split=split_name)
        for col in (prompt_column, answer_column):
            if col not in ds.column_names:
                raise DatasetError(f"dataset {path} split {split_name} has no column {col!r} (columns: {ds.column_names})")
        out = []
        for i, r in enumerate(ds):
            row = dict(r)
            row["prompt"], row["answer"] = row.pop(prompt_column), str(row.pop(answer_column))
            out.append(_check_row(row, f"{path}[{split_name}] row {i}", True))
        return out

    rows = load(split)
    if eval_split:
        return Task(path, train=rows, eval=load(eval_split))
    train, evaluation = split_rows(rows, eval_fraction, seed)
    return Task(path, train=train, eval=evaluation)
