"""Ctrl-C / SIGTERM: stop at the next step boundary with a checkpoint and one line naming the resume command;
a second signal aborts at once; either way the run resumes exactly."""

import json
import os
import signal

import pytest
import torch

import policylab
from policylab.cli import main
from policylab.registry import register
from policylab.train import checkpoint, interrupt
from tests.conftest import TINY_RUN

VOLATILE = ("time/", "tokens_per_s", "memory/")
COMPLETIONS_PER_STEP = TINY_RUN["train.prompts_per_step"] * TINY_RUN["rollout.group_size"]
# eval only at the end, so the reward below is called COMPLETIONS_PER_STEP times per training step
SETTINGS = {**TINY_RUN, "train.steps": 4, "train.eval_size": 4, "train.eval_samples": 0,
            "rewards": [{"name": "numeric_answer"}, {"name": "_test_sends_signals", "weight": 0.0}]}
ARMED = {"call": 0, "at": None, "signals": ()}


@register("reward", "_test_sends_signals")
def sends_signals(prompt, completion, row):
    """0.0 always; when armed, sends ARMED['signals'] to this process at the ARMED['at']-th call."""
    ARMED["call"] += 1
    if ARMED["call"] == ARMED["at"]:
        for sig in ARMED["signals"]:
            os.kill(os.getpid(), sig)
    return 0.0


def arm(during_step: int, *signals) -> None:
    """Signal in the middle of training step ``during_step`` (its first reward call)."""
    ARMED.update(call=0, at=(during_step - 1) * COMPLETIONS_PER_STEP + 1, signals=signals)


@pytest.fixture(autouse=True)
def disarm():
    yield
    ARMED.update(call=0, at=None, signals=())


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_arith_model):
    return _metrics(policylab.train("grpo", run_dir=tmp_path_factory.mktemp("full") / "run", **SETTINGS))


def test_handler_is_two_stage_and_restores_the_previous_one():
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    with interrupt.GracefulStop() as stop:
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before


def test_sigint_stops_after_the_step_checkpoints_and_resumes_exactly(tmp_path, uninterrupted, capfd):
    handler_before = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    arm(3, signal.SIGINT)
    returned = policylab.train("grpo", run_dir=run_dir, **SETTINGS)
    err = capfd.readouterr().err
    assert returned == run_dir
    assert signal.getsignal(signal.SIGINT) is handler_before
    stop_lines = [line for line in err.splitlines() if "stopped at step" in line]
    assert stop_lines == [f"policylab: stopped at step 3; resume with: policylab train --resume {run_dir}"]
    assert "SIGINT received; stopping after this step" in err
    assert interrupt.read_marker(run_dir) == {"step": 3, "signal": "SIGINT", "exit_code": 130,
                                              "resume": f"policylab train --resume {run_dir}"}
    assert checkpoint.latest(run_dir).name == "step-3"
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]  # the step in flight finished, no final eval
    state = torch.load(run_dir / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3

    policylab.train("grpo", run_dir=run_dir, resume=True)
    assert _metrics(run_dir) == uninterrupted
    assert interrupt.read_marker(run_dir) is None  # finished now


def test_sigterm_through_the_cli_prints_one_line_and_exits_143(tmp_path, uninterrupted, capfd):
    run_dir = tmp_path / "run"
    arm(2, signal.SIGTERM)
    words = [f"{k}={json.dumps(v)}" for k, v in SETTINGS.items()]
    assert main(["train", "grpo", "--run-dir", str(run_dir), *words]) == 143
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "run directory" not in captured.out
    assert [line for line in captured.err.splitlines() if "resume with" in line] == [
        f"policylab: stopped at step 2; resume with: policylab train --resume {run_dir}"]
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert _metrics(run_dir) == uninterrupted


def test_second_sigint_aborts_at_once_and_the_last_checkpoint_resumes(tmp_path, uninterrupted, capfd):
    run_dir = tmp_path / "run"
    arm(2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        policylab.train("grpo", run_dir=run_dir, **{**SETTINGS, "train.save_every": 1})
    err = capfd.readouterr().err
    assert "policylab: aborted in step 2; the last checkpoint is step-1; resume with: policylab train --resume" in err
    assert [r["step"] for r in _metrics(run_dir)] == [1]  # aborted inside step 2, before it was logged
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["step-1"]
    assert interrupt.read_marker(run_dir) is None  # an abort is not a graceful stop

    policylab.train("grpo", run_dir=run_dir, resume=True)
    assert _metrics(run_dir) == uninterrupted


def test_cli_second_ctrl_c_exits_130_without_a_traceback(tmp_path, tiny_arith_model, capfd):
    arm(1, signal.SIGINT, signal.SIGINT)
    words = [f"{k}={json.dumps(v)}" for k, v in SETTINGS.items()]
    assert main(["train", "grpo", "--run-dir", str(tmp_path / "run"), *words]) == 130
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "aborted" in line or "interrupted" in line] == [
        "policylab: aborted in step 1; no checkpoint was written"]


def test_interrupt_while_saving_leaves_the_previous_checkpoint_usable(tmp_path, uninterrupted, monkeypatch):
    run_dir = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def interrupted_second_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # step 2's trainer state: the weights are already in the temporary folder
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_second_save)
    with pytest.raises(KeyboardInterrupt):
        policylab.train("grpo", run_dir=run_dir, **{**SETTINGS, "train.save_every": 1})
    monkeypatch.undo()
    assert not (run_dir / "checkpoints" / ".step-2.tmp").exists()  # the half-written one is removed
    assert checkpoint.latest(run_dir).name == "step-1"

    policylab.train("grpo", run_dir=run_dir, resume=True)
    assert _metrics(run_dir) == uninterrupted
    assert not (run_dir / "checkpoints" / ".step-2.tmp").exists()
