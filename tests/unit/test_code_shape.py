"""House rules the packages keep: ruff clean on the rules in pyproject.toml, no module over 500 lines, and no
function over 80 lines unless a ``# long:`` comment right above it says why."""
from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGES = ("data_loader", "sharding", "train", "evaluate", "scmodels", "launch", "scpretrain")


def _modules():
    for pkg in PACKAGES:
        yield from sorted((REPO / pkg).rglob("*.py"))


def test_ruff_is_clean_on_the_packages():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", *PACKAGES],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_modules_and_functions_stay_small():
    big, long = [], []
    for f in _modules():
        src = f.read_text()
        lines = src.splitlines()
        if len(lines) > 500:
            big.append(f"{f.relative_to(REPO)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                above = lines[max(0, first - 4):first - 1]
                if not any(x.strip().startswith("# long:") for x in above):
                    long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not big, big
    assert not long, long


def test_public_functions_have_type_hints():
    """Every public module-level function and public method of a public class: annotated arguments and return."""
    bare = []
    for f in _modules():
        if f.name == "__main__.py":
            continue
        for node in ast.parse(f.read_text()).body:
            members = [node]
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                members = [n for n in node.body if isinstance(n, ast.FunctionDef)]
            for fn in members:
                if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
                    continue
                args = [a for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
                if fn.returns is None or any(a.annotation is None for a in args):
                    bare.append(f"{f.relative_to(REPO)}:{fn.lineno} {fn.name}")
    assert not bare, bare
