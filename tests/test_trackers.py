"""train.report_to: TensorBoard, W&B (offline) and Trackio (local) receive what metrics.jsonl records, each
read back with its own library's reader; a missing library or a failing tracker never costs the run."""

import glob
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import policylab
from policylab import models
from policylab.config import RecipeError, load_recipe
from policylab.train import trackers
from policylab.train.trackers import TrackerUnavailable, Trackers
from tests.conftest import TINY_RUN

SETTINGS = {**TINY_RUN, "train.steps": 3, "train.eval_size": 4, "train.eval_samples": 0}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected(run: Path) -> dict[tuple[int, str], float]:
    """(step, metric) -> value over every metrics.jsonl line (training and eval lines)."""
    return {(r["step"], k): v for r in _records(run) for k, v in trackers.scalars(r).items()}


def test_report_to_names_are_validated_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"train.report_to.*unknown tracker 'wandbb' \(did you mean 'wandb'\?\)"):
        load_recipe("grpo", {"train.report_to": ["tensorboard", "wandbb"]})
    assert load_recipe("grpo", {"train.report_to": "tensorboard,wandb"}).train.report_to == ["tensorboard", "wandb"]
    assert load_recipe("grpo", {"train.report_to": ["trackio", "trackio"]}).train.report_to == ["trackio"]
    assert load_recipe("grpo", {"train.report_to": "none"}).train.report_to == []
    assert load_recipe("grpo").train.report_to == []  # off by default


def test_missing_tracker_library_names_the_extra_before_the_model_loads(tmp_path, monkeypatch, capfd):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tracker check")

    monkeypatch.setattr(models, "load", no_model)
    with pytest.raises(TrackerUnavailable, match=r"'wandb'.*pip install 'policylab\[tracking\]'"):
        policylab.train("grpo", run_dir=tmp_path / "run", **{**SETTINGS, "train.report_to": ["wandb"]})
    assert not (tmp_path / "run").exists()

    from policylab.cli import main

    code = main(["train", "--run-dir", str(tmp_path / "cli"), "train.report_to=[tensorboard,wandb]",
                 *[f"{k}={v}" for k, v in SETTINGS.items()]])
    err = capfd.readouterr().err
    assert code == 2 and "policylab[tracking]" in err and "'wandb'" in err
    assert not (tmp_path / "cli").exists()


def test_tensorboard_events_equal_metrics_jsonl(tmp_path, tiny_arith_model):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = policylab.train("grpo", run_dir=tmp_path / "run", **{**SETTINGS, "train.report_to": ["tensorboard"]})
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    expected = _expected(run)
    assert ("eval/accuracy" in {k for _, k in expected}) and {s for s, _ in expected} == {1, 2, 3}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key  # event files store float32


def _wandb_records(path: str):
    """The protobuf records of a .wandb file: a LevelDB-style log (7-byte header, 32 KiB blocks, each record
    chunk a 7-byte header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield chunks
            chunks = b""


def test_wandb_offline_run_holds_the_metrics(tmp_path, tiny_arith_model):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    # a fresh process: wandb keeps a service and run state per process, and in a shared test worker an
    # earlier test's state once left this run's history unwritten (seen only under pytest -n 2)
    script = textwrap.dedent(f"""
        import json, policylab
        settings = json.loads({json.dumps(json.dumps(SETTINGS))})
        policylab.train("grpo", run_dir={str(tmp_path / "run")!r}, **settings, **{{"train.report_to": ["wandb"]}})
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    (offline,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))  # offline without being told
    history: dict[int, dict] = {}
    for chunk in _wandb_records(offline):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    expected = _expected(run)
    assert sorted(history) == [1, 2, 3]
    for (step, key), value in expected.items():
        assert history[step][key] == pytest.approx(value, rel=1e-9), (step, key)


def test_trackio_local_run_holds_the_metrics(tmp_path, tiny_arith_model):
    pytest.importorskip("trackio")
    # trackio fixes its directory when imported, so the run goes in a fresh process with TRACKIO_DIR set
    script = textwrap.dedent(f"""
        import json, policylab, trackio
        settings = json.loads({json.dumps(json.dumps(SETTINGS))})
        run = policylab.train("grpo", run_dir={str(tmp_path / "run")!r}, **settings, **{{"train.report_to": ["trackio"]}})
        print("LOGS=" + json.dumps(trackio.SQLiteStorage.get_logs("policylab", run.name)))
    """)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-3000:]
    logs = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("LOGS="))[5:])
    assert (tmp_path / "trackio" / "policylab.db").exists()
    got: dict[tuple[int, str], float] = {}
    for row in logs:
        got.update({(row["step"], k): v for k, v in row.items() if k not in ("step", "timestamp")})
    assert got == pytest.approx(_expected(tmp_path / "run"), rel=1e-9)


def test_tracker_failing_mid_run_warns_once_and_training_goes_on(tmp_path, tiny_arith_model, monkeypatch, capfd):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real = SummaryWriter.add_scalar

    def disk_full_from_step_2(self, tag, value, step, *args, **kwargs):
        if step >= 2:
            raise OSError(28, "No space left on device")
        return real(self, tag, value, step, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full_from_step_2)
    run = policylab.train("grpo", run_dir=tmp_path / "run", **{**SETTINGS, "train.steps": 4, "train.report_to": ["tensorboard"]})
    err = capfd.readouterr().err
    assert err.count("tracker 'tensorboard'") == 1 and "failed at step 2" in err and "No space left" in err
    assert [r["step"] for r in _records(run) if "eval/n" not in r] == [1, 2, 3, 4]  # metrics.jsonl is complete
    assert (run / "checkpoints" / "step-4").exists()
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {e.step for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)} == {1}


def test_trackers_switch_off_only_the_failing_one(monkeypatch, tmp_path):
    seen = {"good": [], "flaky": 0, "closed": []}

    class Good:
        def __init__(self, run_dir, config, resume_step):
            pass

        def log(self, step, metrics):
            seen["good"].append((step, metrics))

        def close(self):
            seen["closed"].append("good")

    class Flaky(Good):
        def log(self, step, metrics):
            seen["flaky"] += 1
            raise ConnectionError("network is unreachable")

    class Broken(Good):
        def __init__(self, run_dir, config, resume_step):
            raise PermissionError("read-only file system")

    monkeypatch.setattr(trackers, "ADAPTERS", {"tensorboard": Good, "wandb": Flaky, "trackio": Broken})
    warnings = []
    t = Trackers(["tensorboard", "wandb", "trackio"], tmp_path, {}, warn=warnings.append)
    for step in (1, 2, 3):
        t.log(step, {"step": step, "loss": 0.5 * step, "note": "text", "bad": float("nan"), "flag": True})
    t.close()
    assert seen["good"] == [(1, {"loss": 0.5}), (2, {"loss": 1.0}), (3, {"loss": 1.5})]
    assert seen["flaky"] == 1 and seen["closed"] == ["good"]
    assert len(warnings) == 2
    assert "'trackio' could not start (PermissionError" in warnings[0]
    assert "'wandb' failed at step 1 (ConnectionError: network is unreachable)" in warnings[1]
