"""The project installs as a package: console scripts that resolve, one version, no sys.path edits."""

from __future__ import annotations

import ast
import importlib
import re

import pytest
from conftest import ROOT

import finetune

tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_console_script_resolves_to_a_command():
    scripts = PYPROJECT["project"]["scripts"]
    assert {"finetune-train", "finetune-eval"} <= set(scripts)
    for name, target in scripts.items():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_the_version_lives_in_one_place():
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "finetune.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", finetune.__version__)
    pattern = re.compile(r"""version\s*=\s*["']\d""")
    for path in [ROOT / "pyproject.toml", *ROOT.glob("finetune/**/*.py")]:
        if path != ROOT / "finetune" / "__init__.py":
            assert not pattern.search(path.read_text()), path


def test_the_dependencies_are_requirements_txt():
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}


def edits_sys_path(source: str) -> bool:
    """Whether code (not a string it holds, such as a subprocess's script) calls sys.path.insert/append."""
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append") and ast.unparse(node.func.value) == "sys.path"):
            return True
    return False


def test_no_test_or_benchmark_edits_sys_path():
    assert edits_sys_path("import sys\nsys.path.insert(0, 'x')") and not edits_sys_path("s = 'sys.path.insert(0, 1)'")
    for path in [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("*.py")]:
        assert not edits_sys_path(path.read_text()), path
