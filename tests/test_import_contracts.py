"""The import contracts in .importlinter, checked by import-linter: gpt2lab's layers (cli > ray > server | review >
apps | evaluation | training > generation > sampling | runtime > checkpoints | tokenizer > model > kernels >
the foundation modules), no import cycles between the modules of one package, the kernels and sampling free of
the model. And the layer contract really fails when an arrow goes up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    # in a process of its own: import-linter configures logging, which disables every logger already made
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / '.importlinter')!r}, no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_the_import_contracts_are_kept():
    pytest.importorskip("importlinter", reason="import-linter is not installed")
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("model/compat.py", "from ..generation import engine"),  # the model reaching up to generation
    ("checkpoints/card.py", "from ..training import config"),  # checkpoints reaching up to training
    ("placement.py", "from .model import gpt2"),  # a foundation module importing a layer
])
def test_an_upward_import_breaks_the_layers(tmp_path, module, upward):
    pytest.importorskip("importlinter", reason="import-linter is not installed")
    copy = tmp_path / "gpt2lab"
    shutil.copytree(ROOT / "src" / "gpt2lab", copy, ignore=shutil.ignore_patterns("assets", "static", "__pycache__"))
    with open(copy / module, "a") as fh:
        fh.write(f"\n{upward}  # an arrow going up\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "gpt2lab's layers" in result.stdout and "BROKEN" in result.stdout
    assert f"gpt2lab.{module.removesuffix('.py').replace('/', '.')} ->" in result.stdout, result.stdout
