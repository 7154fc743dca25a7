"""Imports point one way: losses <- teachers / store / server <- trainer <- wiring <- plugin; keys and args are
leaves. Each module's docstring states what it must not import; these tests hold the package to it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "axolotl_xkd"
ABOVE = {"axolotl_xkd.trainer", "axolotl_xkd.wiring", "axolotl_xkd.plugin", "axolotl_xkd.cli"}


def project_imports(path: Path) -> set[str]:
    """The axolotl_xkd modules `path` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("axolotl_xkd"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("axolotl_xkd"))
    return names


@pytest.mark.parametrize("layer", ["losses", "teachers", "store", "server"])
def test_feature_layers_import_nothing_above_them(layer):
    for path in (PACKAGE / layer).glob("*.py"):
        above = {m for m in project_imports(path) if any(m == a or m.startswith(a + ".") for a in ABOVE)}
        assert not above, f"{path.relative_to(PACKAGE.parent)} imports {sorted(above)}"


@pytest.mark.parametrize("leaf", ["keys.py", "topk_rule.py", "integrity.py", "unknown_keys.py", "interrupt.py"])
def test_leaf_modules_import_nothing_of_the_package(leaf):
    assert not project_imports(PACKAGE / leaf)


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("axolotl_xkd.store.format", {"axolotl", "transformers", "deepspeed"}),
        ("axolotl_xkd.server.protocol", {"torch", "axolotl", "transformers"}),
        ("axolotl_xkd.server.client", {"torch", "axolotl", "transformers"}),
        ("axolotl_xkd.teachers.server", {"axolotl", "transformers"}),
        ("axolotl_xkd.frozen_teacher", {"axolotl", "transformers", "deepspeed"}),
        ("axolotl_xkd.cross_tokenizer", {"axolotl", "transformers", "deepspeed"}),
        ("axolotl_xkd.topk_rule", {"torch", "axolotl", "transformers"}),
        ("axolotl_xkd.integrity", {"numpy", "torch", "axolotl", "transformers"}),
    ],
)
def test_module_imports_without_heavy_stack(module, forbidden):
    code = f"import sys, {module}; bad = {forbidden!r} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_benchmarks_import_nothing_from_tests():
    """Benchmarks share the harness through benchmarks/harness.py; tests may import benchmarks, never the reverse."""
    benchmarks = PACKAGE.parent / "benchmarks"
    for path in benchmarks.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                       else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad = [m for m in modules if m == "tests" or m.startswith("tests.")]
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"
