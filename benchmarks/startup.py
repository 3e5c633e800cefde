"""Start-up time of ``gpt2lab generate`` against ``python -c "import torch"`` (issue 18, item 1).

    PYTHONPATH=src python benchmarks/startup.py                    # 5 alternating rounds, a few tokens
    PYTHONPATH=src python benchmarks/startup.py --repeats 9 --model shakespeare-gpt2   # a named model

The bar: the first run of ``gpt2lab generate`` (C kernels already compiled and cached) takes at most 0.6 s
of wall time more than importing torch, measured in the same run. Each round runs every command once, in
turn (a burst of load elsewhere hits all alike); best and median count. Commands:

- ``import torch``: ``python -c "import torch"``, the floor;
- ``gpt2lab generate``: the installed console script (``<python's bin dir>/gpt2lab``, run directly: a
  pyenv shim on PATH would add its own bash start-up), once in fp32 and once with ``--quantization int8``;
- ``python -m gpt2lab generate``: the same through ``-m``.

The generate commands run ``PROMPT`` with ``--max-new-tokens`` tokens and ``--seed 0`` with
``HF_HUB_OFFLINE=1``, so nothing touches the network: on the command's default model (gpt2 when it is in the
Hugging Face cache, else the bundled model) unless ``--model`` names one. One untimed run of
each comes first: it compiles the kernels if they are not cached yet and warms the page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The quick brown fox"


def commands(model: str | None, max_new_tokens: int) -> dict[str, list[str]]:
    """The timed command lines by label."""
    script = Path(sys.executable).with_name("gpt2lab")
    if not script.is_file():  # not installed next to this python: whatever is on PATH
        script = Path(shutil.which("gpt2lab") or "gpt2lab")
    args = ["generate", PROMPT, "--max-new-tokens", str(max_new_tokens), "--seed", "0"]
    if model is not None:
        args += ["--model", model]
    return {
        "import torch": [sys.executable, "-c", "import torch"],
        "gpt2lab generate": [str(script), *args],
        "gpt2lab generate --quantization int8": [str(script), *args, "--quantization", "int8"],
        "python -m gpt2lab generate": [sys.executable, "-m", "gpt2lab", *args],
    }


def run_once(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one run of ``argv``; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed with exit status {proc.returncode}:\n{proc.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per run (default 8)")
    parser.add_argument("--model", help="--model for gpt2lab generate (default: none given, the command's own "
                        "default: gpt2 if cached, else the bundled model)")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmds = commands(args.model, args.max_new_tokens)
    for argv in cmds.values():  # untimed: kernels compiled and cached, files in the page cache
        run_once(argv, env)
    times: dict[str, list[float]] = {label: [] for label in cmds}
    for _ in range(args.repeats):
        for label, argv in cmds.items():
            times[label].append(run_once(argv, env))

    floor_best, floor_median = min(times["import torch"]), statistics.median(times["import torch"])
    print(f"{args.repeats} alternating rounds, {args.max_new_tokens} new tokens, model {args.model or '(default)'}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'command':40} {'best s':>7} {'median s':>9} {'- torch best':>13} {'- torch median':>15}")
    for label, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        print(f"{label:40} {best:7.3f} {median:9.3f} {best - floor_best:+13.3f} {median - floor_median:+15.3f}")
    print("bar (issue 18): gpt2lab generate at most +0.600 s over import torch")


if __name__ == "__main__":
    main()
