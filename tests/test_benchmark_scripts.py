"""The benchmark scripts stay runnable as the package changes: every ``gpt2lab`` name they import exists
(``benchmarks/eval.py`` imported a helper removed from ``gpt2lab.evaluation.common``, inside ``main``, so only a
run found it), and the quick ones run end to end on a tiny model."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _gpt2lab_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from gpt2lab... import name`` in a script, at any depth (imports inside
    functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpt2lab":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "gpt2lab"]
    return found


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_every_gpt2lab_name_a_benchmark_imports_exists(script):
    for module_name, name in _gpt2lab_imports(script):
        module = importlib.import_module(module_name)
        if name and name != "*":
            assert hasattr(module, name) or importlib.util.find_spec(f"{module_name}.{name}") is not None, \
                f"{script.name} imports {name} from {module_name}, which has no such name"


def test_the_perplexity_benchmark_runs_on_a_tiny_model():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(BENCHMARKS / "eval.py"), "--layers", "1", "--embd", "32", "--heads", "2",
                          "--block", "32", "--tokens", "200", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "speed ratio gpt2lab/transformers" in out.stdout
