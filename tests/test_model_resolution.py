"""--model names: built-ins, folders, .gguf files and hub ids; a wrong one fails at once with a suggestion,
before anything is loaded or written."""

import pytest

import policylab
from policylab import models
from policylab.models import ModelError, check_model_name, resolve_model_path
from policylab.tasks.hf_datasets import hub_offline
from tests.conftest import TINY_RUN


def test_misspelled_builtin_suggests_the_builtin():
    with pytest.raises(ModelError, match=r"unknown model 'tiny-arth' \(did you mean 'tiny-arith'"):
        check_model_name("tiny-arth")
    with pytest.raises(ModelError, match=r"did you mean 'smollm2'"):
        check_model_name("smolm2")
    for name in ("tiny", "tiny-arith"):
        check_model_name(name)  # no error, and nothing is built


def test_missing_folder_and_gguf_suggest_nearby_names(tmp_path):
    (tmp_path / "my-model").mkdir()
    (tmp_path / "weights.Q4.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match=r"model folder .*my-modl does not exist \(did you mean '.*my-model'\?\)"):
        check_model_name(str(tmp_path / "my-modl"))
    with pytest.raises(ModelError, match=r"GGUF file .*weight.Q4.gguf does not exist \(did you mean '.*weights.Q4.gguf'"):
        check_model_name(str(tmp_path / "weight.Q4.gguf"))


def test_folder_without_config_is_an_error_and_a_run_directory_points_at_its_checkpoint(tmp_path):
    (tmp_path / "my-model").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        check_model_name(str(tmp_path / "my-model"))
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-10").mkdir()
    with pytest.raises(ModelError, match=r"run directory, its latest checkpoint is .*step-10$"):
        check_model_name(str(run))


def test_hub_id_while_offline_fails_at_once_unless_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"'nobody-xyz/no-such-model' looks like a hub id, but the hub is offline "
                                         r"\(HF_HUB_OFFLINE=1 is set\) and it is not in the Hugging Face cache"):
        check_model_name("nobody-xyz/no-such-model")
    # a cached copy is used as a local folder, so transformers never tries the network
    monkeypatch.setattr(models, "cached_hub_snapshot", lambda repo, repo_type="model": str(tmp_path))
    assert resolve_model_path("nobody-xyz/no-such-model") == str(tmp_path)


def test_unreachable_hub_is_detected_without_the_offline_variable(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    reason = hub_offline(timeout=1.0)
    assert reason is not None and "127.0.0.1" in reason


def test_train_with_a_bad_model_stops_before_the_task_builds_and_writes_nothing(tmp_path, monkeypatch):
    from policylab import registry

    real_build = registry.build

    def build(kind, *args, **kwargs):
        assert kind != "task", "the task was built before the model name was checked"
        return real_build(kind, *args, **kwargs)

    monkeypatch.setattr(registry, "build", build)
    with pytest.raises(ModelError, match="did you mean 'tiny-arith'"):
        policylab.train("grpo", run_dir=tmp_path / "run", **{**TINY_RUN, "model.name": "tiny-arithh"})
    assert not (tmp_path / "run").exists()
