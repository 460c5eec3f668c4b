"""Watching a run: the progress line, the end-of-run summary and curves, `policylab show` and `policylab samples`."""

import json
import re

import pytest

import policylab
from policylab.cli import main
from policylab.train import run_report
from policylab.train.logging import RunLogger
from tests.conftest import TINY_RUN


def write_run(directory, lines, total_steps, checkpoint_step=None, tail=""):
    """A hand-made run folder: config.yaml, metrics.jsonl (``lines`` then ``tail`` verbatim), a checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(f"name: grpo\ntrain:\n  steps: {total_steps}\n")
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    if checkpoint_step is not None:
        ckpt = directory / "checkpoints" / f"step-{checkpoint_step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.pt").write_bytes(b"")
    return directory


def step_line(step, accuracy, step_s):
    return {"step": step, "accuracy": accuracy, "reward/mean": accuracy + 0.5, "time/step_s": step_s}


def eval_line(step, greedy, sampled=None):
    line = {"step": step, "eval/n": 8.0, "eval/accuracy": greedy}
    if sampled is not None:
        line["eval/accuracy_sampled"] = sampled
    return line


KNOWN = [eval_line(0, 0.2, 0.1), step_line(1, 0.1, 1.0), step_line(2, 0.2, 2.0), eval_line(2, 0.6, 0.5),
         step_line(3, 0.3, 3.0), eval_line(3, 0.6, 0.3), step_line(4, 0.4, 6.0), eval_line(4, 0.4, 0.45)]


def assert_valid_png(path):
    import matplotlib.pyplot as plt

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_summary_numbers_of_a_known_finished_run(tmp_path):
    run_dir = write_run(tmp_path / "run", KNOWN, total_steps=4, checkpoint_step=4)
    s = run_report.summarize(run_report.read_run(run_dir))
    assert (s["steps_done"], s["total_steps"], s["mean_step_s"]) == (4, 4, 3.0)
    # best: the first of two equal maxima (steps 2 and 3), not the last evaluation
    assert s["eval"] == {"start": 0.2, "start_step": 0, "end": 0.4, "end_step": 4, "best": 0.6, "best_step": 2,
                         "count": 4}
    assert (s["eval_sampled"]["start"], s["eval_sampled"]["end"], s["eval_sampled"]["best_step"]) == (0.1, 0.45, 2)
    assert s["train_accuracy"] == {"start": 0.1, "end": 0.4, "window": 1}
    assert s["finished"] and s["next"] == f"policylab eval {run_dir}"
    text = run_report.format_summary(s)
    assert "4 of 4, 3.00 s/step on average" in text
    assert "0.200 -> 0.400 greedy (step 0 -> 4; best 0.600 at step 2)" in text
    assert "0.100 -> 0.450 sampled (step 0 -> 4; best 0.500 at step 2)" in text
    assert str(run_dir / "checkpoints" / "step-4") in text and "--resume" not in text


def test_unfinished_run_says_how_to_resume(tmp_path):
    run_dir = write_run(tmp_path / "run", KNOWN, total_steps=10, checkpoint_step=2)
    s = run_report.summarize(run_report.read_run(run_dir))
    assert not s["finished"] and (s["steps_done"], s["total_steps"], s["checkpoint_step"]) == (4, 10, 2)
    text = run_report.format_summary(s)
    assert "4 of 10" in text
    assert f"continue from step 2 with: policylab train --resume {run_dir}" in text
    # the logger's total wins over config.yaml's (a resume may have raised train.steps)
    assert run_report.summarize(run_report.read_run(run_dir), total_steps=2)["finished"]
    bare = write_run(tmp_path / "bare", KNOWN[:3], total_steps=10)
    text = run_report.format_summary(run_report.summarize(run_report.read_run(bare)))
    assert "nothing to resume" in text and "--resume" not in text


def test_train_accuracy_averages_the_first_and_last_tenth():
    run = run_report.RunFiles(run_report.Path("r"), 20, steps=[step_line(i, i / 100, 1.0) for i in range(1, 21)])
    assert run_report.summarize(run)["train_accuracy"] == {"start": pytest.approx(0.015), "end": pytest.approx(0.195),
                                                           "window": 2}


def test_show_on_a_run_being_written_skips_the_torn_line(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", KNOWN[:5], total_steps=4, tail='{"step": 4, "accuracy": 0.')
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 of 4" in out and "skipped the unfinished last line of metrics.jsonl" in out
    assert "0.200 -> 0.600 greedy (step 0 -> 2; best 0.600 at step 2)" in out
    assert "nothing to resume" in out
    assert_valid_png(run_dir / "curves.png")


def test_show_refreshes_the_curves_of_a_growing_run(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", KNOWN[:2], total_steps=4)
    assert main(["show", str(run_dir)]) == 0
    first = (run_dir / "curves.png").read_bytes()
    write_run(tmp_path / "run", KNOWN, total_steps=4)
    assert main(["show", str(run_dir)]) == 0
    assert "4 of 4" in capsys.readouterr().out
    assert (run_dir / "curves.png").read_bytes() != first
    assert not list(run_dir.glob(".*.tmp"))


def test_show_without_evaluations(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", [step_line(1, 0.25, 0.5), step_line(2, 0.75, 1.5)], total_steps=2,
                        checkpoint_step=2)
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "eval accuracy   none logged yet" in out and "0.250 -> 0.750 (first/last step)" in out
    assert "2 of 2, 1.00 s/step" in out
    assert_valid_png(run_dir / "curves.png")


def test_show_errors_on_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["show", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'} is not a policylab run folder: it has no config.yaml" in err
    assert main(["show", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad", KNOWN[:1], total_steps=4, tail="{oops\n" + json.dumps(KNOWN[1]) + "\n")
    assert main(["show", str(bad)]) == 2
    assert "metrics.jsonl:2 is not valid JSON" in capsys.readouterr().err
    assert not (bad / "curves.png").exists()


def write_samples(run_dir, steps):
    rows = [{"step": s, "prompt": f"{s} + {n}=", "completion": f"[bold]{s + n}[/bold]", "answer": str(s + n),
             "reward": float(n % 2)} for s in steps for n in range(2)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "pro')


def test_samples_prints_one_step(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", KNOWN, total_steps=4)
    write_samples(run_dir, [1, 2, 3])
    assert main(["samples", str(run_dir), "--step", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 2: 2 samples" in out
    assert "2 + 0=" in out and "2 + 1=" in out and "3 + 0=" not in out
    assert "[bold]3[/bold]" in out  # completions are printed as written, not read as rich markup
    assert "reward 0.000" in out and "reward 1.000" in out and "answer 3" in out
    assert main(["samples", str(run_dir)]) == 0  # default: the last complete step (the torn line is skipped)
    out = capsys.readouterr().out
    assert "step 3: 2 samples" in out and "3 + 1=" in out and "2 + 0=" not in out


def test_samples_errors_name_the_step_range_and_the_missing_file(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", KNOWN, total_steps=4)
    assert main(["samples", str(run_dir)]) == 2
    assert f"{run_dir / 'samples.jsonl'} does not exist" in capsys.readouterr().err
    write_samples(run_dir, [1, 2, 3])
    assert main(["samples", str(run_dir), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "step 7 has no samples" in err and "logged steps: 1..3" in err
    assert main(["samples", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eta_is_remaining_steps_times_the_mean_step_time():
    assert run_report.eta_seconds(3, [1.0, 2.0, float("nan")]) == 4.5
    assert run_report.eta_seconds(0, [1.0]) == 0.0 and run_report.eta_seconds(5, []) is None
    assert run_report.format_duration(3725.4) == "1:02:05" and run_report.format_duration(None) == "?"


def test_resume_truncation_drops_a_torn_last_line(tmp_path):
    run_dir = write_run(tmp_path / "run", KNOWN, total_steps=4, tail='{"step": 5, "acc')
    RunLogger(run_dir, progress=False).truncate_after(2)
    kept = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kept == [0, 1, 2, 2]
    assert (run_dir / "metrics.discarded.jsonl").read_text().splitlines()[-1] == '{"step": 5, "acc'


def test_a_real_run_prints_its_folder_progress_and_summary(tmp_path, capsys, tiny_arith_model):
    run_dir = policylab.train("grpo", run_dir=tmp_path / "run", **{**TINY_RUN, "train.steps": 3, "train.eval_every": 2})
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "reward/mean" in line]
    evals = [line for line in lines if "eval/accuracy" in line]
    assert [e["step"] for e in evals] == [0, 2, 3]
    # the folder comes first, before the first step
    assert err.index(f"policylab: run folder {run_dir} (step 0 of 3)") < err.index("step 1/3")
    for line in steps:
        shown = re.search(rf"^step {line['step']}/3  (.*)$", err, re.M).group(1)
        assert shown.startswith(f"reward {line['reward/mean']:.3f}  acc {line['accuracy']:.3f}  "
                                f"{line['time/step_s']:.2f} s/step  ETA ")
        last_eval = [e for e in evals if e["step"] < line["step"]][-1]
        assert shown.endswith(f"eval {last_eval['eval/accuracy']:.3f} @ step {last_eval['step']}")
    # the end summary: the numbers of metrics.jsonl, the same text `policylab show` prints
    s = run_report.summarize(run_report.read_run(run_dir))
    assert (s["eval"]["start"], s["eval"]["end"]) == (evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"])
    assert (s["eval_sampled"]["start"], s["eval_sampled"]["end"]) == (evals[0]["eval/accuracy_sampled"],
                                                                        evals[-1]["eval/accuracy_sampled"])
    assert s["mean_step_s"] == pytest.approx(sum(x["time/step_s"] for x in steps) / 3)
    assert s["finished"] and s["steps_done"] == 3
    summary = run_report.format_summary(s)
    assert err.rstrip().endswith(summary)
    assert_valid_png(run_dir / "curves.png")
    assert main(["show", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == summary
    assert main(["samples", str(run_dir), "--step", "3"]) == 0
    out = capsys.readouterr().out
    for sample in [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]:
        if sample["step"] == 3:
            assert sample["prompt"] in out and sample["completion"].strip() in out
