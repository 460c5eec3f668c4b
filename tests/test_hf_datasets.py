"""--task as a Hugging Face dataset (save_to_disk folders, data folders, hub ids) and TRL's conversational
prompts (a list of messages) through the chat template, the engines and the rewards."""

import json

import datasets
import pytest

import policylab
from policylab.models import tiny_tokenizer
from policylab.models.chat import format_prompt
from policylab.registry import names
from policylab.rollout.hf import format_request
from policylab.tasks.files import DatasetError
from policylab.tasks.hf_datasets import hf_dataset_task, task_for_name
from tests.conftest import TINY_RUN

CHAT = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "3 + 4="}]


def _rows(n, conversational=False, answer_column="answer"):
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"{i} + 1="}] if conversational else f"{i} + 1="
        rows.append({"prompt": prompt, answer_column: str(i + 1), "level": i % 3})
    return rows


def test_dataset_dict_saved_to_disk_maps_train_and_test_splits(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(6, True, "solution")),
                          "test": datasets.Dataset.from_list(_rows(2, True, "solution"))}).save_to_disk(str(folder))
    task = hf_dataset_task(path=str(folder))
    assert (len(task.train), len(task.eval)) == (6, 2)
    row = task.train[3]
    # TRL's `solution` column is the answer; the original column stays for TRL-style rewards that name it
    assert row["prompt"] == [{"role": "user", "content": "3 + 1="}] and row["answer"] == "4" and row["solution"] == "4"
    assert row["level"] == 0


def test_single_saved_dataset_and_a_folder_of_jsonl_files_get_a_held_out_split(tmp_path):
    datasets.Dataset.from_list(_rows(10)).save_to_disk(str(tmp_path / "one"))
    task = hf_dataset_task(path=str(tmp_path / "one"), eval_fraction=0.2, seed=3)
    assert (len(task.train), len(task.eval)) == (8, 2)
    assert sorted(r["answer"] for r in task.train + task.eval) == sorted(str(i + 1) for i in range(10))
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(5)))
    (files / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(3)))
    task = hf_dataset_task(path=str(files))
    assert (len(task.train), len(task.eval)) == (5, 3)
    assert task.eval[2] == {"prompt": "2 + 1=", "answer": "3", "level": 2}


def test_bad_rows_and_columns_are_errors_naming_dataset_split_row_and_column(tmp_path):
    good = _rows(4, conversational=True)
    bad_message = [dict(r) for r in good]
    bad_message[2]["prompt"] = [{"role": "user", "content": None}]  # a message without content
    datasets.DatasetDict({"train": datasets.Dataset.from_list(good),
                          "test": datasets.Dataset.from_list(bad_message)}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DatasetError, match=r"split 'test' row 2 .*column 'prompt' message 0"):
        hf_dataset_task(path=str(tmp_path / "bad"))
    renamed = [{"question": r["prompt"], "answer": r["answer"]} for r in good]
    datasets.Dataset.from_list(renamed).save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(DatasetError, match=r"no column 'prompt' .*set task.prompt_column=question"):
        hf_dataset_task(path=str(tmp_path / "renamed"))
    assert hf_dataset_task(path=str(tmp_path / "renamed"), prompt_column="question").train[0]["prompt"][0]["role"] == "user"
    empty_answer = [dict(r) for r in good]
    empty_answer[1]["answer"] = None
    datasets.Dataset.from_list(empty_answer).save_to_disk(str(tmp_path / "noanswer"))
    with pytest.raises(DatasetError, match=r"row 1: column 'answer' is empty"):
        hf_dataset_task(path=str(tmp_path / "noanswer"))
    with pytest.raises(DatasetError, match=r"no split 'tset' \(did you mean 'test'\?\)"):
        hf_dataset_task(path=str(tmp_path / "bad"), eval_split="tset")


def test_missing_folder_suggests_nearby_and_offline_hub_id_fails_fast(tmp_path, monkeypatch):
    (tmp_path / "my_dataset").mkdir()
    (tmp_path / "my_dataset" / "train.jsonl").write_text(json.dumps(_rows(1)[0]) + "\n")
    with pytest.raises(DatasetError, match=r"does not exist \(did you mean '.*my_dataset'\?\)"):
        hf_dataset_task(path=str(tmp_path / "my_datset"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match=r"'nobody-xyz/no-such-dataset' looks like a hub id, but the hub is offline "
                                           r"\(HF_HUB_OFFLINE=1 is set\)"):
        hf_dataset_task(path="nobody-xyz/no-such-dataset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither a saved dataset"):
        hf_dataset_task(path=str(tmp_path / "empty"))


def test_task_names_map_to_their_component_and_registered_names_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arithmetic").mkdir()  # a folder named like a built-in task does not shadow it
    registered = names("task")
    assert task_for_name("arithmetic", registered) is None
    assert task_for_name("data.jsonl", registered) == {"name": "file", "path": "data.jsonl"}
    assert task_for_name("owner/name", registered) == {"name": "hf_dataset", "path": "owner/name"}
    assert task_for_name("./missing", registered) == {"name": "hf_dataset", "path": "./missing"}
    (tmp_path / "saved").mkdir()  # an existing folder is recorded absolute, for a resume from elsewhere
    assert task_for_name("saved", registered) == {"name": "hf_dataset", "path": str(tmp_path / "saved")}
    assert task_for_name("arithmetc", registered) is None  # left to the registry's "did you mean"


def test_format_prompt_takes_message_lists_with_and_without_a_chat_template():
    tok = tiny_tokenizer()
    assert format_prompt(tok, {"prompt": CHAT}) == "Answer with a number.\n3 + 4="
    # the same text the engine's "messages" request path gives a tokenizer without a template
    assert format_prompt(tok, {"prompt": CHAT}) == format_request(tok, {"messages": CHAT})
    assert format_prompt(tok, {"prompt": CHAT[1:], "system": "S"}) == "S\n3 + 4="
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert format_prompt(tok, {"prompt": CHAT}) == "<system>Answer with a number.<user>3 + 4=<a>"
    assert format_prompt(tok, {"prompt": "2+2=", "system": "S"}) == "<system>S<user>2+2=<a>"
    # a system column does not duplicate a system message the list already has
    assert format_prompt(tok, {"prompt": CHAT, "system": "other"}).count("<system>") == 1


def test_train_on_a_saved_conversational_dataset_with_a_trl_reward(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"{a} + {b}="}], "solution": str(a + b)}
            for a in range(6) for b in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]),
                          "test": datasets.Dataset.from_list(rows[20:])}).save_to_disk(str(tmp_path / "sums"))
    seen = []

    def accuracy_reward(completions, solution, **kwargs):  # the signature of TRL's own accuracy reward
        seen.extend(completions)
        return [float(c[0]["content"].strip() == s) for c, s in zip(completions, solution)]

    with pytest.warns(UserWarning, match="cannot be imported again"):
        run = policylab.train("grpo", run_dir=tmp_path / "run", reward_funcs=[accuracy_reward],
                              **{**TINY_RUN, "task": str(tmp_path / "sums"), "train.steps": 1, "train.log_samples": 2})
    assert seen and all(isinstance(c, list) and c[0]["role"] == "assistant" for c in seen)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    # what the model saw: a string (the tiny tokenizer has no template, so the message contents)
    assert samples and all(isinstance(s["prompt"], str) and s["prompt"].endswith("=") for s in samples)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["reward/failed"] == 0.0 and "reward/accuracy_reward" in metrics[0]
