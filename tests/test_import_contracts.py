"""The import contracts in .importlinter (no cycles inside gpt2lab.model, gpt2lab.runtime, gpt2lab.kernels; the
runtime above the model above the kernels; the kernels and sampling free of the model), checked by import-linter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_are_kept():
    pytest.importorskip("importlinter", reason="import-linter is not installed")
    # in a process of its own: import-linter configures logging, which disables every logger already made
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / '.importlinter')!r}, no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
