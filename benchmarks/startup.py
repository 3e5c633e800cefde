"""Start-up time of ``gpt2lab generate`` against ``python -c "import torch"`` (issue 18, item 1).

    PYTHONPATH=src python benchmarks/startup.py                  # 5 alternating rounds, 8 tokens, ~1 minute
    PYTHONPATH=src python benchmarks/startup.py --repeats 9 --model shakespeare-gpt2   # a named model

The bar: the first run of ``gpt2lab generate`` (C kernels already compiled and cached) takes at most 0.6 s
of wall time more than importing torch, measured in the same run. Each round runs every command once, in
turn (a burst of load elsewhere hits all alike); best and median count. Commands:

- ``import torch``: ``python -c "import torch"``, the floor;
- ``gpt2lab generate``: the installed console script (``<python's bin dir>/gpt2lab``, run directly: a
  pyenv shim on PATH would add its own bash start-up), once in fp32 and once with ``--quantization int8``;
- ``python -m gpt2lab generate``: the same through ``-m``.

The generate commands run ``PROMPT`` with ``--max-new-tokens`` tokens and ``--seed 0`` with
``HF_HUB_OFFLINE=1``, so nothing touches the network: on the command's default model (gpt2 when it is in
the Hugging Face cache, else the bundled model) unless ``--model`` names one. One untimed run of each
comes first: it compiles the kernels if they are not cached yet and warms the page cache.

Other processes distort this badly: torch runs its operators and gpt2lab's kernels on one OpenMP thread
per core, and a core that another process holds stalls every parallel region. So each run also records
how many cores' worth of CPU the rest of the machine used meanwhile (Linux: ``/proc/stat`` minus the
run's own CPU time), and the table is printed once for every run and once for the quiet runs only.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The quick brown fox"
QUIET = 0.15  # a run is quiet when other processes used less than this many cores meanwhile


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


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``), None where unknown."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    """``(wall seconds, cores used by other processes meanwhile)`` of one run of ``argv``; exits if it fails."""
    before, busy_before = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    after, busy_after = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_seconds()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed with exit status {proc.returncode}:\n{proc.stderr}")
    if busy_before is None or busy_after is None:
        return seconds, None
    own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, max(0.0, busy_after - busy_before - own) / seconds


def print_table(times: dict[str, list[float]]) -> None:
    floor = times["import torch"]
    print(f"  {'command':40} {'runs':>4} {'best s':>7} {'median s':>9} {'- torch best':>13} {'- torch median':>15}")
    for label, seconds in times.items():
        if not seconds or not floor:
            print(f"  {label:40} {len(seconds):4}")
            continue
        best, median = min(seconds), statistics.median(seconds)
        print(f"  {label:40} {len(seconds):4} {best:7.3f} {median:9.3f} {best - min(floor):+13.3f} "
              f"{median - statistics.median(floor):+15.3f}")


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
    runs: dict[str, list[tuple[float, float | None]]] = {label: [] for label in cmds}
    for _ in range(args.repeats):
        for label, argv in cmds.items():
            runs[label].append(run_once(argv, env))

    print(f"{args.repeats} alternating rounds, {args.max_new_tokens} new tokens, model "
          f"{args.model or '(default)'}, {os.cpu_count()} CPUs")
    print("all runs:")
    print_table({label: [s for s, _ in r] for label, r in runs.items()})
    others = [o for r in runs.values() for _, o in r if o is not None]
    if others:
        print(f"other processes used {statistics.mean(others):.2f} cores on average during the runs "
              f"(max {max(others):.2f}); quiet runs only (under {QUIET} cores):")
        print_table({label: [s for s, o in r if o is not None and o < QUIET] for label, r in runs.items()})
    print("bar (issue 18): gpt2lab generate at most +0.600 s over import torch")


if __name__ == "__main__":
    main()
