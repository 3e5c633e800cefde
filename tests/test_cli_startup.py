"""What ``gpt2lab generate`` imports (issue 18: its first run costs at most 0.6 s more than ``import torch``,
and nothing is imported that the command does not use).

No timings here (``benchmarks/startup.py`` measures them): the real command runs in a subprocess that
prints ``sys.modules`` as it exits, and the test checks the list. (``python -X importtime`` would not
do: it misses modules loaded through ``importlib.import_module``, as lazy imports are.) The default
command is run: no ``--model``, offline with an empty Hugging Face cache, so it falls back to the
bundled model.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from gpt2lab.checkpoints import bundled_model_dir

pytestmark = pytest.mark.skipif(bundled_model_dir("shakespeare-gpt2") is None,
                                reason="the bundled model is not installed")

PROMPT = "ROMEO:"
# Modules of other commands and of optional extras that generating text has no use for
# (a name also rules out its submodules).
NOT_NEEDED = (
    # other gpt2lab commands and what only they use
    "gpt2lab.server", "gpt2lab.training.trainer", "gpt2lab.training.data", "gpt2lab.training.config",
    "gpt2lab.training.records", "gpt2lab.training.sampler", "gpt2lab.training.optimization",
    "gpt2lab.training.distributed",
    "gpt2lab.review", "gpt2lab.evaluation", "gpt2lab.apps",
    "gpt2lab.cli.serve", "gpt2lab.cli.train", "gpt2lab.cli.review", "gpt2lab.cli.eval", "gpt2lab.cli.chat",
    "gpt2lab.cli.story", "gpt2lab.cli.augment", "gpt2lab.cli.explore", "gpt2lab.cli.info",
    "gpt2lab.generation.beam", "gpt2lab.generation.chat_format", "gpt2lab.generation.chat_template",
    # optional extras and test-only packages
    "fastapi", "uvicorn", "starlette", "prometheus_client", "transformers", "peft", "datasets", "pyarrow",
    "matplotlib", "sacrebleu", "rouge_score", "sklearn", "scipy", "krippendorff", "jinja2", "tensorboard",
    "ctranslate2", "openai", "tiktoken",
)
# torch's compiler stack: eager inference never needs it, and recent torch leaves it out of ``import torch``;
# it is pulled in (1.5 s or more) by the first PyTorch op run through a Python reference kernel, e.g. any
# arithmetic on meta tensors. Checked among what the command imports beyond ``import torch``.
TORCH_COMPILER = ("torch._dynamo", "torch._inductor", "sympy")


# ``python -m gpt2lab ARGS...`` that prints every imported module's name as the process exits: the CLI
# leaves through os._exit once torch is loaded (cli/main.py), which skips atexit, so that is wrapped too
RUN_AND_LIST_MODULES = """
import atexit, os, runpy, sys

def report():
    sys.stderr.write("".join(f"imported: {name}\\n" for name in sorted(sys.modules)))
    sys.stderr.flush()

atexit.register(report)
os_exit = os._exit
os._exit = lambda code: (report(), os_exit(code))
runpy.run_module("gpt2lab", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def imported_by(tmp_path_factory):
    """``imported_by(*args)``: every module ``gpt2lab generate PROMPT ARGS...`` has imported when it exits;
    each command runs once per test module."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path_factory.mktemp("hf"))}  # an empty cache: the bundled model

    @functools.cache
    def run(*args: str) -> frozenset[str]:
        proc = subprocess.run([sys.executable, "-c", RUN_AND_LIST_MODULES, "generate", PROMPT,
                               "--max-new-tokens", "2", "--seed", "0", *args],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith(PROMPT), proc.stdout  # it really generated
        modules = frozenset(line.removeprefix("imported: ") for line in proc.stderr.splitlines()
                            if line.startswith("imported: "))
        # the command's own path is in the list: it is complete
        assert {"torch", "tokenizers", "gpt2lab.cli.generate", "gpt2lab.generation.engine"} <= modules
        return modules

    return run


@functools.cache
def modules_of_import_torch() -> frozenset[str]:
    proc = subprocess.run([sys.executable, "-c", "import sys, torch; print('\\n'.join(sys.modules))"],
                          capture_output=True, text=True, timeout=300, check=True)
    return frozenset(proc.stdout.split())


def offending(modules: frozenset[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


RUNS = {"fp32": (), "int8": ("--quantization", "int8")}


@pytest.mark.parametrize("run", RUNS)
def test_generate_imports_nothing_it_does_not_use(imported_by, run):
    unneeded = offending(imported_by(*RUNS[run]), NOT_NEEDED)
    assert not unneeded, f"gpt2lab generate imported {', '.join(unneeded)}"


@pytest.mark.parametrize("run", RUNS)
def test_generate_does_not_load_torch_compiler(imported_by, run):
    beyond_torch = imported_by(*RUNS[run]) - modules_of_import_torch()
    compiler = offending(beyond_torch, TORCH_COMPILER)
    assert not compiler, f"gpt2lab generate imported {len(compiler)} modules of torch's compiler: {compiler[:5]}"
