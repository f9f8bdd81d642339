"""The reward package imports nothing from rlpost: a checker knows nothing of training."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _is_rlpost(module: str) -> bool:
    return module == "rlpost" or module.startswith("rlpost.")


def _dynamic_import(node: ast.AST) -> str | None:
    """The module named by a literal `importlib.import_module("...")` / `__import__("...")` call."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    first = node.args[0]
    if name in ("import_module", "__import__") and isinstance(first, ast.Constant) \
            and isinstance(first.value, str):
        return first.value
    return None


def _registry_values(tree: ast.Module) -> list[ast.expr]:
    """The value nodes of the module-level `REGISTRY = {...}` dict literal."""
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "REGISTRY" for t in targets):
            assert isinstance(node.value, ast.Dict), f"line {node.lineno}: REGISTRY is not a dict literal"
            return list(node.value.values)
    return []


def rlpost_references(path: Path, root: Path) -> list[str]:
    """`file:line: what` for each import of rlpost in `path` (file named relative to `root`).

    In a `registry.py`, each REGISTRY value whose module part is in rlpost counts too.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _is_rlpost(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_rlpost(node.module or ""):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif _is_rlpost(_dynamic_import(node) or ""):
            found.append((node.lineno, f"dynamic import of {_dynamic_import(node)}"))
    if path.name == "registry.py":
        for value in _registry_values(tree):
            assert isinstance(value, ast.Constant) and isinstance(value.value, str), \
                f"{path}:{value.lineno}: REGISTRY value is not a string literal"
            if _is_rlpost(value.value.partition(":")[0]):
                found.append((value.lineno, f"REGISTRY value {value.value!r}"))
    where = path.relative_to(root)
    return [f"{where}:{line}: {what}" for line, what in sorted(found)]


def test_rewards_import_nothing_from_rlpost():
    files = sorted((REPO / "rewards").rglob("*.py"))
    assert REPO / "rewards" / "registry.py" in files
    found = [ref for path in files for ref in rlpost_references(path, REPO)]
    assert not found, "rewards/ refers to rlpost:\n" + "\n".join(found)


def test_the_checker_finds_each_kind_of_reference(tmp_path):
    (tmp_path / "registry.py").write_text(
        "import os, rlpost.cli\n"
        "from rlpost.errors import UserError\n"
        "from rlpostal import x\n"
        "from . import rlpost\n"
        "def f():\n"
        "    import importlib\n"
        "    return importlib.import_module('rlpost.loop')\n"
        "REGISTRY = {\n"
        "    'a': 'rlpost.tasks.arithmetic:exact_match_reward',\n"
        "    'b': 'rewards.arithmetic:exact_match_reward',\n"
        "}\n")
    assert rlpost_references(tmp_path / "registry.py", tmp_path) == [
        "registry.py:1: import rlpost.cli",
        "registry.py:2: from rlpost.errors import ...",
        "registry.py:7: dynamic import of rlpost.loop",
        "registry.py:9: REGISTRY value 'rlpost.tasks.arithmetic:exact_match_reward'",
    ]
