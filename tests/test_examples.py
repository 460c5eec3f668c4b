"""examples/: every ```bash block of examples/README.md runs as printed (in a copy of examples/, so runs/ and
arena/ land in tmp_path), then the outcome each section promises is checked: exit code 0, the run folder's
metrics.jsonl with the expected steps, the custom rewards logged by name, the arena report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = EXAMPLES / "README.md"


def sections() -> dict[str, list[str]]:
    """Each `## ` heading of examples/README.md -> its ```bash blocks, in order."""
    out: dict[str, list[str]] = {}
    heading = None
    for part in re.split(r"^## (.+)$", README.read_text(), flags=re.M)[1:]:
        if heading is None:
            heading = part.strip()
            continue
        out[heading] = re.findall(r"^```bash\n(.*?)^```$", part, flags=re.M | re.S)
        heading = None
    return out


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, eval lines) of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [m for m in lines if "loss" in m], [m for m in lines if "eval/accuracy" in m]


def check_custom_reward(cwd: Path, out: str) -> None:
    train, evals = metrics(cwd / "runs" / "custom-reward")
    assert [m["step"] for m in train] == [1, 2, 3, 4]  # 3 steps, then resumed to 4
    for name in ("exact_sum", "digits_only"):  # each user reward is logged under its function's name
        assert all(f"reward/{name}" in m for m in train), name
        assert all(0.0 <= m[f"reward/{name}"] <= 1.0 for m in train), name
    assert "reward/numeric_answer" not in train[0]  # --reward replaced the recipe's reward
    assert evals and evals[-1]["step"] == 4
    config = (cwd / "runs" / "custom-reward" / "config.yaml").read_text()
    assert f"{cwd / 'examples' / 'custom_reward' / 'my_rewards.py'}:exact_sum" in config  # recorded absolute
    report = json.loads(re.findall(r"^\{$.*?^\}$", out, flags=re.M | re.S)[-1])  # `policylab eval` prints JSON
    assert report["num_prompts"] == 8 and 0.0 <= report["pass@2"] <= 1.0


def check_custom_dataset(cwd: Path, out: str) -> None:
    import datasets

    data = datasets.load_from_disk(str(cwd / "runs" / "data" / "sums"))
    assert {k: len(v) for k, v in data.items()} == {"train": 80, "test": 20}
    assert data["train"][0]["prompt"] == [{"role": "user", "content": "0 + 0="}]
    train, evals = metrics(cwd / "runs" / "custom-dataset")
    assert [m["step"] for m in train] == [1, 2, 3]
    assert evals and evals[-1]["eval/n"] == 8
    samples = [json.loads(line) for line in (cwd / "runs" / "custom-dataset" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["answer"] in {str(n) for n in range(19)} for s in samples)  # the `solution` column


def check_arena(cwd: Path, out: str) -> None:
    arena_dir = cwd / "arena" / "two-recipes"
    assert (arena_dir / "report.html").stat().st_size > 0
    assert f"report: {Path('arena') / 'two-recipes' / 'report.html'}" in out
    summary = json.loads((arena_dir / "summary.json").read_text())
    assert {r["status"] for r in summary["runs"]} == {"done"}, summary["runs"]
    assert set(summary["recipes"]) == {"grpo", "dr_grpo"}
    for label in ("grpo", "dr_grpo"):
        assert summary["recipes"][label]["k"] == 2
        train, _ = metrics(arena_dir / "runs" / f"{label}-seed0")
        assert [m["step"] for m in train] == [1, 2, 3]


def check_python_api(cwd: Path, out: str) -> None:
    printed = re.findall(r"^run folder: (.+)$", out, flags=re.M)
    assert len(printed) == 1, out[-2000:]
    run_dir = cwd / printed[0]
    assert run_dir.parent == cwd / "runs" and run_dir.name.startswith("grpo-tiny-arith-")
    train, evals = metrics(run_dir)
    assert [m["step"] for m in train] == [1, 2, 3] and evals
    # weights 1.0 and 0.1: the total is exact_sum + 0.1 * digits_only for every completion, so on the means too
    for m in train:
        if m["reward/failed"] == 0:  # a failed reward (None) drops that completion from the means
            assert m["reward/mean"] == pytest.approx(m["reward/exact_sum"] + 0.1 * m["reward/digits_only"], abs=1e-5)
    assert "my_rewards:exact_sum" in (run_dir / "config.yaml").read_text()
    assert "cannot be imported again" not in out  # the functions come from a module, not from __main__


CHECKS = {"custom_reward/": check_custom_reward, "custom_dataset/": check_custom_dataset,
          "arena/": check_arena, "python_api.py": check_python_api}


def test_every_example_has_a_readme_section_with_commands_and_a_check():
    found = sections()
    for heading, blocks in found.items():
        assert blocks, f"examples/README.md section {heading!r} has no ```bash block"
        assert sum(key in heading for key in CHECKS) == 1, f"no check in tests/test_examples.py for {heading!r}"
    for key in CHECKS:
        assert any(key in heading for heading in found), f"examples/README.md has no section for {key}"
        assert (EXAMPLES / key).exists(), key
    for entry in EXAMPLES.iterdir():  # every example file or folder is documented
        if entry.name != "README.md" and entry.name != "__pycache__":
            assert entry.name + ("/" if entry.is_dir() else "") in README.read_text(), entry.name


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CHECKS))
def test_example_runs_as_printed(key, tmp_path, tiny_arith_model):
    heading = next(h for h in sections() if key in h)
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    out = ""
    for block in sections()[heading]:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        out += proc.stdout + proc.stderr
        assert proc.returncode == 0, f"examples/README.md ({heading}) failed:\n{block}\n{out[-4000:]}"
    CHECKS[key](tmp_path, out)
