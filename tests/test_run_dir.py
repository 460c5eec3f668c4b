"""The run directory under faults: a second process, a torn metrics line, a damaged or malicious checkpoint, a full
disk, a crash before the first checkpoint, a finished run resumed (issue 12, deliverable 3)."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import policylab
from policylab.cli import main
from policylab.train import checkpoint
from policylab.train.loop import TrainingError
from policylab.train.run_dir import LOCK_FILE, RunLock, write_atomic
from tests.conftest import TINY_RUN

VOLATILE = ("time/", "tokens_per_s", "memory/")
SETTINGS = {**TINY_RUN, "train.steps": 3, "train.eval_size": 4, "train.eval_samples": 0, "train.save_every": 1}
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _metrics(run):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in _lines(run)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_arith_model):
    """A finished 3-step run with checkpoints at steps 2 and 3 (every step, the last two kept)."""
    return policylab.train("grpo", run_dir=tmp_path_factory.mktemp("done") / "run", **SETTINGS)


def _copy(run, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# -- the lock ----------------------------------------------------------------------------------------


def _hold_lock(directory):
    """A second process that takes the lock and waits; returns it once it holds the lock."""
    code = textwrap.dedent(f"""
        import sys, time
        from policylab.train.run_dir import RunLock
        lock = RunLock.acquire({str(directory)!r})
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_or_resume_in_a_locked_directory_is_refused_naming_the_pid(tmp_path, finished, capfd):
    run = _copy(finished, tmp_path)
    holder = _hold_lock(run)
    try:
        with pytest.raises(TrainingError, match=rf"in use by another policylab process \(PID {holder.pid}"):
            policylab.train("grpo", run_dir=run, resume=True, **{"train.steps": 4})
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        other = _hold_lock(fresh)
        try:
            words = [f"{k}={json.dumps(v)}" for k, v in SETTINGS.items()]
            assert main(["train", "grpo", "--run-dir", str(fresh), *words]) == 2
            assert f"PID {other.pid}" in capfd.readouterr().err
            assert not (fresh / "metrics.jsonl").exists()  # refused before anything ran
        finally:
            other.kill()
            other.wait()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed, no release): the kernel dropped its flock; its PID is left as a stale lock
    policylab.train("grpo", run_dir=run, resume=True, **{"train.steps": 4})
    err = capfd.readouterr().err
    assert f"taking over the stale lock of PID {holder.pid}" in err
    assert [r["step"] for r in _lines(run) if "reward/mean" in r] == [1, 2, 3, 4]


def test_a_cleanly_released_lock_is_silent_and_within_one_process_exclusive(tmp_path, capfd):
    lock = RunLock.acquire(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(TrainingError, match=f"PID {os.getpid()}"):
        RunLock.acquire(tmp_path)
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    RunLock.acquire(tmp_path, warn=pytest.fail).release()  # no stale-lock warning after a clean release


# -- metrics.jsonl -----------------------------------------------------------------------------------


def test_torn_last_metrics_line_is_reported_and_dropped_on_resume(tmp_path, finished, capfd):
    run = _copy(finished, tmp_path)
    before = _metrics(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward/me')  # killed mid-write
    policylab.train("grpo", run_dir=run, resume=True, **{"train.steps": 4})
    err = capfd.readouterr().err
    assert "metrics.jsonl:5: the last line is torn" in err and "dropped" in err
    after = _metrics(run)
    assert after[: len(before)] == before and [r["step"] for r in after[len(before):]] == [4, 4]  # step + final eval
    assert '"reward/me' in (run / "metrics.discarded.jsonl").read_text()


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, finished):
    run = _copy(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainingError, match=r"metrics.jsonl:2 is not valid JSON"):
        policylab.train("grpo", run_dir=run, resume=True, **{"train.steps": 4})


def test_resume_truncation_is_write_to_temporary_and_rename(tmp_path, finished, monkeypatch):
    """A kill (here: an error) while the resume rewrites metrics.jsonl leaves the old file whole."""
    run = _copy(finished, tmp_path)
    (run / "checkpoints" / "step-3").rename(run / "checkpoints" / "gone")  # resume from step 2: lines to drop
    original = (run / "metrics.jsonl").read_text()
    real_replace = os.replace

    def killed_replace(src, dst):
        if str(dst).endswith("metrics.jsonl"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        policylab.train("grpo", run_dir=run, resume=True)
    assert (run / "metrics.jsonl").read_text() == original


def test_write_atomic_names_the_path_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TrainingError, match=rf"could not write {target}: No space left on device \(the disk"):
        write_atomic(target, "new\n")
    assert target.read_text() == "old\n" and list(tmp_path.iterdir()) == [target]


# -- checkpoints -------------------------------------------------------------------------------------


def test_default_saves_periodically_so_a_crash_is_resumable(tmp_path, tiny_arith_model):
    """Before: save_every 0, so a crash at step 3 of 4 left no checkpoint. Now 'auto' saves at step 1 (every
    ceil(4/10) = 1 steps; the first save is never skipped) and at step 2 unless the step-1 save took more than a
    tenth of the time since."""
    calls = {"n": 0}

    @policylab.registry.register("reward", "_test_crashes_in_step_3")
    def crashes(prompt, completion, row):
        calls["n"] += 1
        if calls["n"] > 2 * 16:  # 16 completions a step: inside step 3
            raise SystemExit("simulated crash")
        return 0.0

    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        policylab.train("grpo", run_dir=run, **{**SETTINGS, "train.steps": 4, "train.save_every": "auto",
                                                "rewards": [{"name": "numeric_answer"},
                                                            {"name": "_test_crashes_in_step_3", "weight": 0.0}]})
    assert checkpoint.latest(run).name in ("step-1", "step-2")
    calls["n"] = -10**9
    policylab.train("grpo", run_dir=run, resume=True)
    assert [r["step"] for r in _lines(run) if "reward/mean" in r] == [1, 2, 3, 4]
    assert checkpoint.save_interval("auto", 4) == 1 and checkpoint.save_interval("auto", 20) == 2
    assert checkpoint.save_interval("auto", 100_000) == 100 and checkpoint.save_interval(0, 50) == 0


def test_auto_schedule_skips_saves_that_would_cost_more_than_a_tenth_of_the_time():
    now = [0.0]
    schedule = checkpoint.SaveSchedule("auto", 100, clock=lambda: now[0])  # every 10 steps
    assert not schedule.due(5) and schedule.due(10)

    def slow_save():
        now[0] += 12.0  # a 12 s checkpoint

    schedule.run(slow_save)
    now[0] += 100.0  # 100 s of training later: less than 10 x 12 s
    assert not schedule.due(20)
    now[0] += 20.0
    assert schedule.due(30)
    fixed = checkpoint.SaveSchedule(10, 100, clock=lambda: now[0])
    fixed.run(slow_save)
    assert fixed.due(20)  # a number given by the user is kept exactly


def test_a_crash_before_the_first_checkpoint_is_accepted_by_resume_and_by_a_fresh_start(tmp_path, tiny_arith_model,
                                                                                         capfd):
    run = tmp_path / "run"
    run.mkdir()
    uninterrupted = _metrics(policylab.train("grpo", run_dir=tmp_path / "ref", **SETTINGS))
    for how in ("resume", "fresh"):
        # what a crash in step 1 left: the recipe and a logged step-0 line, no checkpoint
        (run / "config.yaml").write_text((tmp_path / "ref" / "config.yaml").read_text())
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
        if how == "resume":
            policylab.train("grpo", run_dir=run, resume=True)
        else:
            policylab.train("grpo", run_dir=run, **SETTINGS)
        assert "holds no checkpoint" in capfd.readouterr().err
        assert _metrics(run) == uninterrupted
        import shutil

        shutil.rmtree(run / "checkpoints")
    # a directory with a checkpoint is still refused for a fresh start (there is something to lose)
    with pytest.raises(TrainingError, match="already holds a run"):
        policylab.train("grpo", run_dir=tmp_path / "ref", **SETTINGS)


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, finished, capfd):
    run = _copy(finished, tmp_path)
    manifest = json.loads((run / "checkpoints" / "step-3" / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 3 and {"size", "sha256"} <= set(manifest["files"]["model.safetensors"])
    weights = run / "checkpoints" / "step-3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit: the size is right, the contents are not
    weights.write_bytes(bytes(data))
    assert "does not match the sha256" in checkpoint.verify(run / "checkpoints" / "step-3")
    policylab.train("grpo", run_dir=run, resume=True, **{"train.steps": 4})
    err = capfd.readouterr().err
    assert "step-3 is damaged (model.safetensors does not match the sha256" in err
    assert "resuming from step-2, the newest intact checkpoint" in err
    steps = [r["step"] for r in _lines(run) if "reward/mean" in r]
    assert steps == [1, 2, 3, 4]
    # every checkpoint damaged: an error naming each, not a traceback from safetensors
    for folder in checkpoint.checkpoints(run):
        (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match=r"no intact checkpoint under .*step-4: model.safetensors has 7 bytes"):
        policylab.train("grpo", run_dir=run, resume=True, **{"train.steps": 5})


def test_disk_full_during_a_checkpoint_names_the_path_and_leaves_no_partial_one(tmp_path, tiny_arith_model, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def full_disk_on_second(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_on_second)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"could not write checkpoint .*step-2: No space left on device \(the disk"
                                            r".*the previous checkpoint .*step-1 is intact"):
        policylab.train("grpo", run_dir=run, **SETTINGS)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]


def test_safetensors_disk_full_error_is_reported_the_same_way(tmp_path):
    class Model:
        def save_pretrained(self, folder):
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                               '"No space left on device" })')

    with pytest.raises(TrainingError, match=r"could not write checkpoint .*step-5: .*StorageFull.*no earlier checkpoint"):
        checkpoint.save(tmp_path, 5, Model(), None, {})
    assert list((tmp_path / "checkpoints").iterdir()) == []


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_trainer_state_is_loaded_without_unpickling_arbitrary_objects(tmp_path, finished):
    run = _copy(finished, tmp_path)
    marker = tmp_path / "code-ran"
    _Payload.marker = marker
    folder = run / "checkpoints" / "step-3"
    state = torch.load(folder / checkpoint.STATE_FILE, weights_only=True)
    state["components"]["evil"] = _Payload()
    torch.save(state, folder / checkpoint.STATE_FILE)
    (folder / checkpoint.MANIFEST).unlink()
    checkpoint._write_manifest(folder, 3)  # a consistent manifest: the attacker controls the whole folder
    with pytest.raises(TrainingError, match="does not unpickle them"):
        policylab.train("grpo", run_dir=run, resume=True, **{"train.steps": 4})
    assert not marker.exists()


def test_a_component_state_that_cannot_load_safely_fails_at_the_first_save(tmp_path):
    class Model:
        def save_pretrained(self, folder):
            folder.mkdir(parents=True, exist_ok=True)

    class Tok(Model):
        pass

    with pytest.raises(TrainingError, match=r"trainer state of step 1 holds objects a resume cannot load safely \(\w+\.system"):
        checkpoint.save(tmp_path, 1, Model(), Tok(), {"components": {"x": _Payload()}})
    assert list((tmp_path / "checkpoints").iterdir()) == []


# -- a finished run --------------------------------------------------------------------------------


def test_resuming_a_finished_run_does_nothing_and_says_so(tmp_path, finished, capfd):
    run = _copy(finished, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    words = []
    assert main(["train", "--resume", str(run), *words]) == 0
    err = capfd.readouterr().err
    assert f"policylab: run {run} already finished at step 3 of 3; nothing to do" in err
    assert (run / "metrics.jsonl").read_text() == before  # no duplicate final eval line


def test_an_old_pickled_trainer_state_is_refused_with_the_conversion_command(tmp_path):
    import numpy as np

    folder = tmp_path / "checkpoints" / "step-1"
    folder.mkdir(parents=True)
    old_rng = {"python": __import__("random").getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"step": 1, "rng": old_rng}, folder / checkpoint.STATE_FILE)  # the format before this change
    with pytest.raises(TrainingError, match="--convert-trusted"):
        checkpoint.load_trainer_state(folder)
    checkpoint.convert_trusted(folder)
    state = checkpoint.load_trainer_state(folder)
    assert checkpoint.verify(folder) is None
    before = np.random.get_state()[1].copy()
    np.random.seed(123)
    checkpoint.set_rng_state(state["rng"])
    assert (np.random.get_state()[1] == before).all()
