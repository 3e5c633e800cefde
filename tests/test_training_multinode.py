"""``torchrun --nnodes 2`` (c10d rendezvous) as two "nodes" on this machine: the same weights as one process with
the same global batch, and a run whose second node is SIGKILLed resumes to those weights (docs/training.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .server_helpers import free_port
from .test_chat_training import _env, _finetune, _varied

pytestmark = pytest.mark.slow

COMMON = ("--max-steps", "4", "--eval-every", "2", "--grad-accum", "2", "--dropout", "0")


def _nodes(cmd: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Two torchrun agents, node ranks 0 and 1, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    procs = []
    for node in (0, 1):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                    "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--rdzv-id", "test", "--max-restarts", "0"]
        log = open(log_dir / f"node{node}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([*torchrun, *cmd[1:]], env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # a process group: the node's agent and worker
    return procs


def _wait(procs: list[subprocess.Popen], log_dir: Path, timeout: float = 600) -> None:
    for node, proc in enumerate(procs):
        rc = proc.wait(timeout=timeout)
        assert rc == 0, (log_dir / f"node{node}.log").read_text()[-3000:]


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_two_nodes_match_one_process_and_resume_after_a_node_is_killed(tmp_path, tiny_checkpoint):
    data = _varied(tmp_path, 32)
    single, nodes, resumed = tmp_path / "single", tmp_path / "nodes", tmp_path / "resumed"

    def cmd(out: Path, *extra: str) -> list[str]:  # half the batch per node: the same global batch
        c = _finetune(data, out, "--model", str(tiny_checkpoint), *COMMON, *extra)
        c[c.index("--batch-size") + 1] = "2"
        return c

    # the one-process reference and the two nodes run at the same time (independent runs; less wall time)
    reference = subprocess.Popen(_finetune(data, single, "--model", str(tiny_checkpoint), *COMMON), env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait(_nodes(cmd(nodes), tmp_path), tmp_path)
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    assert _max_diff(single, nodes) < 1e-4
    assert (nodes / "data" / "meta.json").is_file()  # one token cache, in the shared output folder

    # kill node 1 (its agent and worker) once the first checkpoint is written; node 0 then stops too
    from gpt2lab.training.checkpoint import CheckpointDir

    procs = _nodes(cmd(resumed), tmp_path)
    deadline = time.monotonic() + 600
    while CheckpointDir(resumed / "trainer").latest() is None and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a node ended before the first checkpoint"
        time.sleep(0.05)
    assert procs[1].poll() is None, "training finished before a node could be killed"
    os.killpg(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    try:
        assert procs[0].wait(timeout=180) != 0  # its peer is gone: the step's all-reduce fails
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
    _wait(_nodes(cmd(resumed, "--resume"), tmp_path), tmp_path)
    assert _max_diff(single, resumed) < 1e-4
