"""tests/unit stays fast: no unit test loads the real SmolLM2 (those live in tests/e2e, marked slow)."""

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT


def _real_model_uses(path) -> list[str]:
    """Places in a test file that load the real model: the spec string, or the `smollm2` fixture as a parameter."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and node.value == "smollm2-135m":
            found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.FunctionDef) and any(arg.arg == "smollm2" for arg in node.args.args):
            found.append(f"{path.name}:{node.lineno} ({node.name})")
    return found


def test_no_unit_test_loads_the_real_model():
    unit_tests = [path for path in sorted((REPO_ROOT / "tests" / "unit").glob("test_*.py"))]
    uses = [use for path in unit_tests if path.resolve() != Path(__file__).resolve() for use in _real_model_uses(path)]
    assert uses == [], "move these to tests/e2e (and mark them slow): " + ", ".join(uses)


def test_the_check_finds_the_real_model_where_it_is_used():
    assert _real_model_uses(REPO_ROOT / "tests" / "e2e" / "test_doctor_smollm2.py")
