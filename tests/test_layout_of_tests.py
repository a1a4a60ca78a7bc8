"""The test suite's own layout (issue 28 item 5): test modules share fixtures through conftest.py and plain helpers
through tests/helpers/, never by importing one another (which re-registers another module's fixtures and tests
under a second name, and ties unrelated files together)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in the file, at any depth (function-level imports included)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # "from . import test_x" / "from .test_x import"
            out += [(node.lineno, f"{node.module or ''}.{a.name}".strip(".")) for a in node.names]
    return out


def _is_test_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and (parts[0].startswith("test_") or parts[0] == "conftest")


def test_no_test_module_imports_another_test_module():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, mod in _imported_modules(tree):
            if _is_test_module(mod):
                offenders.append(f"{path.relative_to(TESTS)}:{line} imports {mod}")
    assert not offenders, ("share fixtures through tests/conftest.py and helpers through tests/helpers/, not by "
                           "importing a test module:\n" + "\n".join(offenders))


def test_helpers_hold_no_tests_or_fixtures():
    """tests/helpers/ is plain code: a test there would never be collected, a fixture there never registered."""
    for path in sorted((TESTS / "helpers").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert not node.name.startswith("test_"), f"{path.name}: {node.name}"
                for d in node.decorator_list:
                    assert "fixture" not in ast.unparse(d), f"{path.name}: fixture {node.name} belongs in conftest.py"


def test_the_import_check_sees_the_forms_it_must_refuse():
    src = ("from test_engine import _slices\nimport test_dicom as td\nfrom tests.test_kfp_watch import s3\n"
           "def f():\n    from test_preprocess import prepared_env\n"
           "from helpers.dicom import make_affine\nimport dvc_project\nfrom siteadapt.steps import test_split\n")
    flagged = [m for _, m in _imported_modules(ast.parse(src)) if _is_test_module(m)]
    assert flagged == ["test_engine", "test_dicom", "tests.test_kfp_watch", "test_preprocess"]
