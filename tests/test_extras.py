"""Optional extras: without them a command says in one line which extra to install, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# command -> (arguments, the extra it must name)
NEEDS = {
    "serve": (["serve", "--model", "shakespeare-gpt2", "--port", "0"], "server"),
    "eval text": (["eval", "text", "-p", "{preds}"], "eval"),
    "explore": (["explore", "Hello", "--out", "{out}", "--samples", "1"], "eval"),
    "generate --ray": (["generate", "Hello", "--out", "{out}", "--ray"], "ray"),
    "augment --ray": (["augment", "{preds}", "--out", "{out}", "--ray", "auto"], "ray"),
    "eval perplexity --ray": (["eval", "perplexity", "{preds}", "--ray"], "ray"),
    "generate": (["generate", "Hello", "--choice", "yes", "--choice", "no"], "structured"),
}


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A new virtual environment with torch and ``pip install -e .`` only: no extras (about 45 s)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["torch==2.13.0"], ["-e", str(ROOT)]):
        result = subprocess.run(pip + args, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"cannot build a bare environment here (pip install {' '.join(args)} failed): "
                        f"{result.stderr[-500:]}")
    return venv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return dict(env, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(NEEDS))
def test_command_without_its_extra_names_it_in_one_line(bare_venv, tmp_path, command):
    args, extra = NEEDS[command]
    preds = tmp_path / "preds.txt"
    preds.write_text("a generated text\n", encoding="utf-8")
    out = tmp_path / "explore-out"
    args = [a.format(preds=preds, out=out) for a in args]
    python = bare_venv / "bin" / "python"
    for module in ("sacrebleu", "fastapi", "llguidance", "ray"):  # it really is bare
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, env=_env())
        assert probe.returncode != 0, f"{module} is installed in the bare environment"
    result = subprocess.run([str(bare_venv / "bin" / "gpt2lab"), *args], capture_output=True, text=True,
                            env=_env(), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"gpt2lab: error: gpt2lab {command} needs the optional '{extra}' dependencies")
    assert f"pip install 'gpt2lab[{extra}]'" in lines[0]
    assert not out.exists()  # no work done, nothing written


@pytest.mark.slow
def test_commands_without_extras_still_work_in_the_bare_environment(bare_venv, tmp_path):
    result = subprocess.run([str(bare_venv / "bin" / "gpt2lab"), "generate", "ROMEO:", "--max-new-tokens", "3",
                             "--seed", "0"], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ROMEO:")


def test_require_extra_names_missing_modules():
    import typer

    from gpt2lab.cli.common import require_extra

    require_extra("server", "gpt2lab serve", ("json",))  # present: nothing happens
    with pytest.raises(typer.Exit) as info:
        require_extra("eval", "gpt2lab eval text", ("no_such_module_gpt2lab",))
    assert info.value.exit_code == 2
