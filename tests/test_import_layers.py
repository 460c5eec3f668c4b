"""The layered import structure of policylab: every module sits on a floor and imports only from its own
floor or below. Checked on the source text (AST), so imports inside functions count as arrows too.

A new top-level package must be placed in FLOORS deliberately (test_every_module_has_a_floor).
KNOWN_VIOLATIONS only shrinks: an entry that no longer occurs fails test_known_violations_still_occur.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "policylab"

# module prefix -> floor (lowest first); a module maps to the floor of its longest matching prefix
FLOORS: dict[str, int] = {
    # 0 core: containers, registry, field names, interfaces, parameter specs, the recipe schema
    "policylab.registry": 0, "policylab.rollouts": 0, "policylab.fields": 0,
    "policylab.interfaces": 0, "policylab.params": 0, "policylab.config": 0,
    # 1 algo: pure math on tensors (advantages, objectives, optimizers, regularizers); torch + core, not config
    "policylab.algo": 1,
    # 2 tasks: data (prompt/answer rows, task builders)
    "policylab.tasks": 2,
    # 3 rewards: verifiers, shaping, judges as reward functions
    "policylab.rewards": 3,
    # 3 environments: multi-turn environments and their tools (tools may run in the rewards' code sandbox)
    "policylab.environments": 3,
    # 4 models: loading, teacher-forced forward, vocab log-probs, chat formatting, supervised warm-up
    "policylab.models": 4,
    # 5 rollout: generation engines
    "policylab.rollout": 5,
    # 6 annotate: model-driving components (probes, critics, judges as annotators)
    "policylab.annotate": 6,
    # 7 sampling: prompt/group samplers and filters
    "policylab.sampling": 7,
    # 8 train: the loop, update step, checkpoints, logging
    "policylab.train": 8,
    # 9 eval: metrics, evaluation, arena, reports
    "policylab.eval": 9,
    # 10 top: entry points and the package itself
    "policylab.cli": 10, "policylab.testing": 10, "policylab.__main__": 10, "policylab": 10,
}

# floor 1 must stay pure math: these floor-0 modules are off limits to it
FORBIDDEN = {("policylab.algo", "policylab.config")}

# (importer module, imported module) arrows being removed right now; the list may only shrink
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in FLOORS:
            return FLOORS[prefix]
    return None


def _prefix_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return ".".join(parts[:n])
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """(line, imported module) for every policylab import in ``path``, relative imports resolved."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "policylab" or alias.name.startswith("policylab."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "policylab" or target.startswith("policylab.")):
                continue
            # `from policylab import models` / `from . import vocab` names a module: resolve each name
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or \
                        (PACKAGE.parent / sub.replace(".", "/")).is_dir():
                    yield node.lineno, sub
                else:
                    yield node.lineno, target


def _module_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def upward_arrows():
    """(importer module, imported module, 'file:line importer -> imported (floor a -> floor b)')."""
    found = {}
    for path in _module_files():
        src = module_name(path)
        a = floor_of(src)
        for line, dst in _imports(path):
            b = floor_of(dst)
            if a is None or b is None:
                continue  # reported by test_every_module_has_a_floor
            forbidden = any(src.startswith(x) and (dst == y or dst.startswith(y + ".")) for x, y in FORBIDDEN)
            if b > a or forbidden:
                where = f"{path.relative_to(SRC.parent)}:{line}"
                why = f"floor {a} -> floor {b}" + (", forbidden" if forbidden else "")
                found[where, dst] = (src, dst, f"{where} {src} -> {dst} ({why})")
    return list(found.values())


def test_every_module_has_a_floor():
    missing = [module_name(p) for p in _module_files() if floor_of(module_name(p)) is None
               or (_prefix_of(module_name(p)) == "policylab" and module_name(p) != "policylab")]
    assert not missing, "modules on no floor (add their package to FLOORS deliberately):\n" + "\n".join(missing)


def test_no_upward_imports():
    bad = [msg for src, dst, msg in upward_arrows() if (src, dst) not in set(KNOWN_VIOLATIONS)]
    assert not bad, "upward imports (a module may import only its own floor or below):\n" + "\n".join(bad)


def test_known_violations_still_occur():
    present = {(src, dst) for src, dst, _ in upward_arrows()}
    gone = sorted(set(KNOWN_VIOLATIONS) - present)  # set(): an emptied `{}` literal is a dict
    assert not gone, "KNOWN_VIOLATIONS entries that no longer occur; remove them from the list:\n" + \
        "\n".join(f"{s} -> {d}" for s, d in gone)
