"""The arena on synthetic runs: a fake train function writes metrics.jsonl files whose final numbers are
chosen by hand, so every number in summary.json and the report can be checked against arithmetic done
here. One slow end-to-end test runs the real loop on the tiny model."""

from __future__ import annotations

import base64
import json
import math
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest

from policylab.eval import arena as A
from policylab.eval.summary import read_metrics

T_975_DF1 = 12.706204736  # two-sided 95% t critical value with 1 degree of freedom (t tables)

# recipe -> seed -> (held-out greedy accuracy, s/step, pass@1, pass@4)
FINALS = {
    "grpo": {0: (0.5, 2.0, 0.40, 0.80), 1: (0.7, 2.0, 0.50, 0.90)},
    "dapo": {0: (0.6, 3.0, 0.45, 0.85), 1: (0.9, 3.0, 0.65, 0.95)},
}
STEPS = 5


def synthetic_metrics(recipe: str, seed: int, steps: int = STEPS) -> list[dict]:
    """Training lines with known shapes, then the loop's final eval line."""
    accuracy, step_s, _, _ = FINALS[recipe][seed]
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "reward/mean": 0.1 * step + 0.01 * seed, "accuracy": accuracy * step / steps,
                      "entropy": 2.0 - 0.2 * step, "completion_length/mean": 10.0 + step, "time/step_s": step_s})
    lines.append({"step": steps, "eval/accuracy": accuracy, "eval/n": 16.0})
    return lines


class FakeTrain:
    """Stands in for policylab.train: writes a synthetic run and records how it was called."""

    def __init__(self, fail_on: set[tuple[str, int]] = frozenset(), interrupt_on: set[tuple[str, int]] = frozenset()):
        self.calls: list[dict] = []
        self.fail_on, self.interrupt_on = fail_on, interrupt_on

    def __call__(self, recipe, *, run_dir, resume=False, **overrides):
        seed = overrides["train.seed"]
        self.calls.append({"recipe": recipe, "run_dir": Path(run_dir), "resume": resume, **overrides})
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lines = synthetic_metrics(recipe, seed, overrides["train.steps"])
        if (recipe, seed) in self.interrupt_on:
            (run_dir / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
            raise KeyboardInterrupt
        if (recipe, seed) in self.fail_on:
            raise RuntimeError(f"synthetic failure of {recipe}")
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return run_dir


START = {"greedy_accuracy": 0.25, "accuracy": 0.2, "pass@1": 0.2, "pass@2": 0.3, "pass@4": 0.5}


def fake_evaluate(run_dir: Path | str, spec) -> dict:
    if isinstance(run_dir, str) or run_dir.name == "start_model":  # the start model: a name, or the warm-up folder
        return dict(START)
    recipe, seed = run_dir.name.rsplit("-seed", 1)
    accuracy, _, p1, p4 = FINALS[recipe][int(seed)]
    return {"greedy_accuracy": accuracy, "accuracy": p1, "pass@1": p1, "pass@2": (p1 + p4) / 2, "pass@4": p4}


def build_synthetic_arena(root: Path, name: str = "synthetic", eval_k: int = 4) -> Path:
    """A finished 2-recipe x 2-seed arena with hand-chosen numbers; returns its folder."""
    spec = A.ArenaSpec(name=name, recipes=["grpo", "dapo"], seeds=[0, 1], steps=STEPS, model="tiny", eval_k=eval_k)
    return A.run_arena(spec, root, train_fn=FakeTrain(), evaluate_fn=fake_evaluate, log=lambda m: None)


# ----------------------------------------------------------------------------------------------


class _Report(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self._table = attrs.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse_report(path: Path) -> _Report:
    parser = _Report()
    parser.feed(path.read_text())
    return parser


def test_summary_numbers_match_hand_arithmetic(tmp_path):
    arena_dir = build_synthetic_arena(tmp_path)
    summary = json.loads((arena_dir / "summary.json").read_text())
    grpo, dapo = summary["recipes"]["grpo"], summary["recipes"]["dapo"]
    sd = math.sqrt(0.02)  # sample std of (0.5, 0.7)
    assert grpo["heldout_accuracy"]["mean"] == pytest.approx(0.6)
    assert grpo["heldout_accuracy"]["ci95"] == pytest.approx(T_975_DF1 * sd / math.sqrt(2), rel=1e-6)
    assert dapo["heldout_accuracy"]["mean"] == pytest.approx(0.75)
    assert grpo["pass@k"]["mean"] == pytest.approx(0.85) and grpo["k"] == 4
    assert dapo["pass@1"]["mean"] == pytest.approx(0.55)
    assert grpo["s_per_step"] == {"mean": 2.0, "ci95": 0.0, "low": 2.0, "high": 2.0, "n": 2}
    # last 20% of 5 steps = the last step: entropy 2.0 - 0.2*5 = 1.0, reward 0.5 + 0.01*seed
    assert grpo["entropy"]["mean"] == pytest.approx(1.0)
    assert grpo["train_reward"]["mean"] == pytest.approx(0.505)
    assert grpo["wall_clock_s"]["mean"] == pytest.approx(10.0)
    # paired differences dapo - grpo over seeds 0, 1: (0.1, 0.2)
    diff = summary["differences"]["dapo"]["heldout_accuracy"]
    assert diff["method"] == "paired" and diff["mean"] == pytest.approx(0.15)
    assert diff["ci95"] == pytest.approx(T_975_DF1 * math.sqrt(0.005) / math.sqrt(2), rel=1e-6)
    assert summary["differences"]["dapo"]["s_per_step"]["mean"] == pytest.approx(1.0)
    assert summary["baseline"] == "grpo" and "grpo" not in summary["differences"]
    assert summary["recipes"]["grpo"]["pass_curve"]["2"]["mean"] == pytest.approx((0.6 + 0.7) / 2)
    assert {r["status"] for r in summary["runs"]} == {"done"}


def test_report_has_table_rows_and_every_plot_inline(tmp_path):
    arena_dir = build_synthetic_arena(tmp_path)
    report = parse_report(arena_dir / "report.html")
    results = report.tables["results"]
    assert results[0][:5] == ["recipe", "seeds", "held-out accuracy (greedy)", "pass@1", "pass@4"]
    assert [row[0] for row in results[1:]] == ["grpo", "dapo", "start model"]
    assert results[1][2] == "0.600 ± 1.271"  # 12.706 * sd 0.1414 / sqrt(2)
    diffs = report.tables["differences"]
    assert diffs[1][0] == "dapo − grpo" and diffs[1][1] == "paired" and diffs[1][2].startswith("+0.150 ±")
    plots = sorted(p.name for p in (arena_dir / "plots").glob("*.png"))
    assert len(report.images) == len(plots) == 7
    for src in report.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_same_budget_and_data_order_for_every_recipe(tmp_path):
    fake = FakeTrain()
    spec = A.ArenaSpec(name="budget", recipes=["grpo", "dapo"], seeds=[3, 4], steps=STEPS, model="tiny",
                       task="arithmetic", overrides={"rollout.group_size": 4})
    A.run_arena(spec, tmp_path, train_fn=fake, evaluate_fn=fake_evaluate, log=lambda m: None)
    assert [(c["recipe"], c["train.seed"]) for c in fake.calls] == [("grpo", 3), ("dapo", 3), ("grpo", 4), ("dapo", 4)]
    for call in fake.calls:
        shared = {k: v for k, v in call.items() if k not in ("recipe", "run_dir", "train.seed")}
        assert shared == {"resume": False, "train.steps": STEPS, "model.name": "tiny", "task.name": "arithmetic",
                          "rollout.group_size": 4}
    assert fake.calls[0]["run_dir"] == tmp_path / "budget" / "runs" / "grpo-seed3"


def test_resume_skips_finished_runs_and_restarts_the_interrupted_one(tmp_path):
    spec = A.ArenaSpec(name="resume", recipes=["grpo", "dapo"], seeds=[0, 1], steps=STEPS, model="tiny")
    first = FakeTrain(interrupt_on={("grpo", 1)})
    with pytest.raises(KeyboardInterrupt):
        A.run_arena(spec, tmp_path, train_fn=first, evaluate_fn=fake_evaluate, log=lambda m: None)
    runs = tmp_path / "resume" / "runs"
    assert (runs / "grpo-seed0" / "DONE").exists() and (runs / "dapo-seed0" / "DONE").exists()
    assert not (runs / "grpo-seed1" / "DONE").exists()
    second = FakeTrain()
    A.run_arena(spec, tmp_path, train_fn=second, evaluate_fn=fake_evaluate, log=lambda m: None)
    assert [(c["recipe"], c["train.seed"], c["resume"]) for c in second.calls] == [("grpo", 1, False), ("dapo", 1, False)]
    # the interrupted run started over: its metrics are the complete synthetic file, not appended to the torn one
    steps, evals = read_metrics(runs / "grpo-seed1" / "metrics.jsonl")
    assert len(steps) == STEPS and len(evals) == 1
    third = FakeTrain()
    A.run_arena(spec, tmp_path, train_fn=third, evaluate_fn=fake_evaluate, log=lambda m: None)
    assert third.calls == []


def test_interrupted_run_with_a_checkpoint_resumes_it(tmp_path):
    spec = A.ArenaSpec(name="ckpt", recipes=["grpo"], seeds=[0], steps=STEPS, model="tiny", eval_k=4)
    run_dir = tmp_path / "ckpt" / "runs" / "grpo-seed0"
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-2" / "trainer_state.pt").write_bytes(b"x")
    fake = FakeTrain()
    A.run_arena(spec, tmp_path, train_fn=fake, evaluate_fn=fake_evaluate, log=lambda m: None)
    assert len(fake.calls) == 1 and fake.calls[0]["resume"] is True
    # a checkpoint at the final step means training finished: only the evaluation is redone
    (run_dir / "DONE").unlink()
    (run_dir / "checkpoints" / f"step-{STEPS}").mkdir()
    (run_dir / "checkpoints" / f"step-{STEPS}" / "trainer_state.pt").write_bytes(b"x")
    (run_dir / "eval.json").unlink()
    fake = FakeTrain()
    A.run_arena(spec, tmp_path, train_fn=fake, evaluate_fn=fake_evaluate, log=lambda m: None)
    assert fake.calls == [] and (run_dir / "eval.json").exists() and (run_dir / "DONE").exists()


def test_failed_run_is_reported_and_retried(tmp_path):
    spec = A.ArenaSpec(name="fail", recipes=["grpo", "dapo"], seeds=[0], steps=STEPS, model="tiny", eval_k=4)
    A.run_arena(spec, tmp_path, train_fn=FakeTrain(fail_on={("dapo", 0)}), evaluate_fn=fake_evaluate, log=lambda m: None)
    arena_dir = tmp_path / "fail"
    assert "synthetic failure of dapo" in (arena_dir / "runs" / "dapo-seed0" / "FAILED").read_text()
    summary = json.loads((arena_dir / "summary.json").read_text())
    status = {r["label"]: r["status"] for r in summary["runs"]}
    assert status == {"grpo": "done", "dapo": "failed"}
    assert summary["recipes"]["dapo"]["seeds"] == [] and summary["recipes"]["dapo"]["heldout_accuracy"] is None
    report = parse_report(arena_dir / "report.html")
    assert ["dapo", "0", "failed"] == report.tables["runs"][2][:3]
    retry = FakeTrain()
    A.run_arena(spec, tmp_path, train_fn=retry, evaluate_fn=fake_evaluate, log=lambda m: None)
    assert [c["recipe"] for c in retry.calls] == ["dapo"]
    assert not (arena_dir / "runs" / "dapo-seed0" / "FAILED").exists()


def test_changed_settings_are_refused_but_new_seeds_may_be_added(tmp_path):
    build_synthetic_arena(tmp_path, name="fixed")
    spec = A.ArenaSpec(name="fixed", recipes=["grpo", "dapo"], seeds=[0, 1], steps=STEPS + 1, model="tiny", eval_k=4)
    with pytest.raises(A.ArenaError, match="steps: 5 -> 6"):
        A.run_arena(spec, tmp_path, train_fn=FakeTrain(), evaluate_fn=fake_evaluate, log=lambda m: None)
    more = A.ArenaSpec(name="fixed", recipes=["grpo"], seeds=[0], steps=STEPS, model="tiny", eval_k=4)
    fake = FakeTrain()
    A.run_arena(more, tmp_path, train_fn=fake, evaluate_fn=fake_evaluate, log=lambda m: None)
    assert fake.calls == []
    saved = json.loads((tmp_path / "fixed" / "arena.json").read_text())
    assert saved["recipes"] == ["grpo", "dapo"] and saved["seeds"] == [0, 1]


def test_loop_eval_lines_are_used_without_arena_evaluation(tmp_path):
    arena_dir = build_synthetic_arena(tmp_path, name="noeval", eval_k=0)
    summary = json.loads((arena_dir / "summary.json").read_text())
    assert summary["recipes"]["dapo"]["heldout_accuracy"]["mean"] == pytest.approx(0.75)
    assert summary["recipes"]["dapo"]["pass@1"] is None and summary["recipes"]["dapo"]["k"] is None
    assert len(parse_report(arena_dir / "report.html").images) == 7  # the pass@k plot says "no data"


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = synthetic_metrics("grpo", 0)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 6, "rew')
    steps, evals = read_metrics(path)
    assert len(steps) == STEPS and evals == [{"accuracy": 0.5, "n": 16.0, "step": STEPS}]
    path.write_text('{"step": 1\n' + json.dumps(lines[1]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        read_metrics(path)


def test_spec_validation_and_labels():
    with pytest.raises(A.ArenaError, match="seeds repeat"):
        A.ArenaSpec(name="x", recipes=["grpo"], seeds=[0, 0])
    with pytest.raises(A.ArenaError, match="at least one recipe"):
        A.ArenaSpec(name="x", recipes=[])
    with pytest.raises(A.ArenaError, match="unknown keys"):
        A.ArenaSpec(name="x", recipes=["grpo"], warmup={"stepz": 3})
    spec = A.ArenaSpec(name="x", recipes=["grpo", "my/grpo.yaml", "dapo"])
    assert spec.labels() == [("grpo", "grpo"), ("grpo-2", "my/grpo.yaml"), ("dapo", "dapo")]


def _args(**kw):
    base = dict(recipes=[], preset=None, name=None, task=None, model=None, steps=None, seeds=None, seed_list=None,
                set=[], eval_k=None, eval_size=None, warmup_steps=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_preset_and_flags():
    preset = A.load_preset("tiny-baselines")
    assert preset["recipes"] == ["grpo", "dr_grpo", "dapo", "gspo"] and preset["seeds"] == [0, 1, 2]
    assert preset["model"] == "tiny-arith"
    spec = A.spec_from_args(_args(preset="tiny-baselines", steps=2, seeds=1, set=["rollout.group_size=2"]))
    assert spec.steps == 2 and spec.seeds == [0] and spec.overrides["rollout.group_size"] == 2
    assert spec.name == "tiny-baselines" and spec.recipes == preset["recipes"]
    spec = A.spec_from_args(_args(recipes=["grpo", "dapo"], model="tiny", steps=3, seed_list="5,7"))
    assert spec.name == "grpo-vs-dapo-tiny-3steps" and spec.seeds == [5, 7]
    with pytest.raises(A.ArenaError, match="unknown arena preset 'tiny-baseline'.*tiny-baselines"):
        A.load_preset("tiny-baseline")


def test_preset_recipes_and_overrides_validate():
    from policylab.config import load_recipe

    preset = A.load_preset("tiny-baselines")
    spec = A.ArenaSpec(**preset)
    for recipe in spec.recipes:
        loaded = load_recipe(recipe, A.run_overrides(spec, 0, spec.model))
        assert loaded.train.steps == spec.steps and loaded.model.name == "tiny-arith"


def test_main_arena_cli_errors(capsys):
    assert A.main_arena(["--steps", "2"]) == 2
    assert "at least one recipe" in capsys.readouterr().err
    assert A.main_arena(["grpoo", "--model", "tiny", "--steps", "1"]) == 2
    assert "grpoo" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_tiny_arena(tmp_path):
    """2 recipes x 1 seed x 2 steps through the real loop and the real final evaluation."""
    # recipes without dynamic sampling: an untrained tiny model gives all-zero groups, which DAPO's filter
    # would (rightly) refuse to train on
    code = A.main_arena(["grpo", "dr_grpo", "--model", "tiny", "--steps", "2", "--seeds", "1", "--name", "e2e",
                         "--out", str(tmp_path), "--eval-k", "2", "--eval-size", "4",
                         "--set", "rollout.group_size=2", "--set", "train.prompts_per_step=2",
                         "--set", "rollout.max_new_tokens=4", "--set", "train.eval_size=4"])
    assert code == 0
    arena_dir = tmp_path / "e2e"
    summary = json.loads((arena_dir / "summary.json").read_text())
    assert {r["status"] for r in summary["runs"]} == {"done"}, summary["runs"]
    for label in ("grpo", "dr_grpo"):
        entry = summary["recipes"][label]
        assert entry["seeds"] == [0] and entry["k"] == 2
        assert 0.0 <= entry["pass@k"]["mean"] <= 1.0 and entry["s_per_step"]["mean"] > 0
        assert entry["cpu_s_per_step"]["mean"] > 0  # the loop logs time/step_cpu_s
        steps, _ = read_metrics(arena_dir / "runs" / f"{label}-seed0" / "metrics.jsonl")
        assert [s["step"] for s in steps] == [1, 2]
    assert len(parse_report(arena_dir / "report.html").images) == 7
    start = json.loads((arena_dir / "start_model" / "eval.json").read_text())  # the real start-model evaluation
    assert start["num_prompts"] == 4 and 0.0 <= start["pass@2"] <= 1.0
    assert summary["headlines"] and summary["headlines"][0].startswith("dr_grpo vs grpo: ")


def test_smoothing_keeps_length_and_means():
    from policylab.eval.report import smooth, smoothing_window

    assert smooth([0.0, 3.0, 0.0, 3.0], 3) == [1.5, 1.0, 2.0, 1.5]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]
    assert smoothing_window(5) == 1 and smoothing_window(50) == 5 and smoothing_window(40) == 5


def test_start_model_row_and_final_heldout_points(tmp_path):
    from policylab.eval.report import _eval_points
    from policylab.eval.summary import read_run

    arena_dir = build_synthetic_arena(tmp_path, name="start")  # no warm-up: the start model is `tiny` itself
    assert json.loads((arena_dir / "start_model" / "eval.json").read_text()) == START
    rows = parse_report(arena_dir / "report.html").tables["results"]
    assert rows[-1][:5] == ["start model", "–", "0.250", "0.200", "0.500"]
    runs = [read_run("grpo", "grpo", seed, arena_dir / "runs" / f"grpo-seed{seed}") for seed in (0, 1)]
    # the loop's eval line and the arena's evaluation sit at the last step: the arena's greedy numbers win
    assert _eval_points(runs) == ([float(STEPS)], [pytest.approx(0.6)])


def test_verdicts_in_words():
    from policylab.eval.stats import Interval, verdict

    assert verdict(Interval(0.05, 0.03, 3)).kind == "higher" and verdict(Interval(0.05, 0.03, 3)).significant
    assert verdict(Interval(-0.05, 0.03, 3)).kind == "lower"
    assert verdict(Interval(0.0, 0.043, 3)).kind == "no difference"
    assert verdict(Interval(0.02, 0.043, 3)).text == "+0.020 ± 0.043, 3 seeds"
    # every seed gave the same difference: a zero-width interval is a tie, not certainty, below 5 seeds
    tie = verdict(Interval(-0.010, 0.0, 3))
    assert tie.kind == "identical" and not tie.significant and "identical across seeds" in tie.text
    assert verdict(Interval(-0.010, 0.0, 5)).kind == "lower"
    assert verdict(Interval(0.0, 0.0, 8)).kind == "identical"
    assert verdict(Interval(0.1, None, 1)).kind == "one seed"


def test_headline_per_comparison_and_zero_width_is_not_bold(tmp_path, monkeypatch):
    arena_dir = build_synthetic_arena(tmp_path)
    summary = json.loads((arena_dir / "summary.json").read_text())
    # dapo - grpo = (0.1, 0.2): +0.150 ± 12.706 * 0.0707 / 1.414 = ± 0.635, spans 0
    assert summary["headlines"] == ["dapo vs grpo: no difference in held-out accuracy beyond noise "
                                    "(+0.150 ± 0.635, 2 seeds)"]
    report = (arena_dir / "report.html").read_text()
    assert "dapo vs grpo: no difference in held-out accuracy beyond noise" in report
    # same difference on both seeds: +0.100 with zero width must read as a tie, not in bold
    monkeypatch.setitem(FINALS, "dapo", {0: (0.6, 3.0, 0.45, 0.85), 1: (0.8, 3.0, 0.65, 0.95)})
    tied = build_synthetic_arena(tmp_path, name="tied")
    summary = json.loads((tied / "summary.json").read_text())
    assert summary["headlines"][0].startswith("dapo vs grpo: inconclusive on held-out accuracy: identical across seeds")
    cell = parse_report(tied / "report.html").tables["differences"][1][2]
    assert cell == "+0.100 ± 0.000 (identical across seeds)"
    assert "<b>+0.100" not in (tied / "report.html").read_text()


def test_step_time_is_the_median_and_cpu_seconds_are_reported(tmp_path):
    from policylab.eval.summary import read_run

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lines = [{"step": i + 1, "time/step_s": t, "time/step_cpu_s": c}
             for i, (t, c) in enumerate([(1.0, 1.8), (1.2, 2.0), (30.0, 2.1), (1.1, 1.9)])]  # step 3: machine busy
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "DONE").write_text("{}")
    final = read_run("grpo", "grpo", 0, run_dir).final()
    assert final["s_per_step"] == pytest.approx(1.15) and final["cpu_s_per_step"] == pytest.approx(1.95)
