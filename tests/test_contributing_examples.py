"""Every Python block of CONTRIBUTING.md runs as printed (in order, in one namespace)."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def test_contributing_examples_run_as_printed():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"CONTRIBUTING.md block {i}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - report which block broke
            raise AssertionError(f"CONTRIBUTING.md python block {i} fails: {type(err).__name__}: {err}") from err
