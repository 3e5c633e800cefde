"""Crash-safe training checkpoints: a SIGKILL at every stage of a save, then --resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.training import TrainConfig, train
from gpt2lab.training.checkpoint import LATEST, SAVE_STAGES, CheckpointDir

ROOT = Path(__file__).resolve().parents[1]
TINY = "n_layer=2,n_head=2,n_embd=32,n_positions=64,dropout=0.1"
# saves at steps 2, 4, 6 and 8; the crash is injected into the second one (step 4)
SAVED_BEFORE, SAVING = 2, 4


def _nth(stage: str) -> int:
    """Which time the process reaches ``stage`` in the second save: pruning first happens there."""
    return 1 if stage == "checkpoint.removing" else 2


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GPT2LAB_CRASH_AT"}
    return dict(env, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **more)


def _train(corpus: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gpt2lab", "train", str(corpus), "--config", TINY, "--out", str(out),
           "--max-steps", "8", "--batch-size", "4", "--block-size", "32", "--lr", "2e-3", "--eval-every", "4",
           "--save-every", "2", "--log-every", "1", "--seed", "3", "--threads", "1", "--no-progress", *extra]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("crash-data") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    return path


def _train_here(corpus: Path, out: Path, resume: bool = False) -> None:
    """The same run as :func:`_train`, in this process (only the killed runs need a process of their own)."""
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(data=[str(corpus)], out=str(out), config=TINY, max_steps=8, batch_size=4, block_size=32,
                          lr=2e-3, eval_every=4, save_every=2, log_every=1, seed=3, threads=1, progress=False,
                          resume=resume))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash-ref") / "out"
    _train_here(corpus, out)
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _curve(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def _stale(out: Path) -> list[str]:
    return sorted(p.name for d in (out, out / "trainer") if d.is_dir() for p in d.iterdir() if p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.parametrize("stage", SAVE_STAGES)
def test_sigkill_at_every_stage_of_a_save_then_resume(corpus, reference, tmp_path, stage, capsys):
    out = tmp_path / "out"
    killed = _train(corpus, out, GPT2LAB_CRASH_AT=f"{stage}@{_nth(stage)}")
    assert killed.returncode == -9, f"the crash point {stage!r} was not reached: {killed.stderr[-2000:]}"
    latest = CheckpointDir(out / "trainer").latest()
    assert latest is not None, f"no complete checkpoint after a crash at {stage!r}"
    step = torch.load(latest / "state.pt", weights_only=True)["step"]
    switched = SAVE_STAGES.index(stage) >= SAVE_STAGES.index("latest.replaced")
    assert step == (SAVING if switched else SAVED_BEFORE), stage
    assert (latest / "model" / "model.safetensors").is_file()
    left = _stale(out)
    capsys.readouterr()
    _train_here(corpus, out, resume=True)
    assert f"resuming {out} at step {step}/8" in capsys.readouterr().err
    assert _stale(out) == [], f"temporaries left by the kill ({left}) were not cleaned"
    ref, got = _weights(reference), _weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), "weights differ"
    assert _curve(out) == _curve(reference)  # metrics.jsonl kept, each step once
    steps = sorted(p.name for p in (out / "trainer").iterdir())
    assert steps == [LATEST, "step-00000008"]  # keep-last-1 pruned the older ones


def test_latest_pointer_is_the_switch(tmp_path):
    """Unit view of the sequence: until the pointer moves, the previous checkpoint is the latest."""
    ck = CheckpointDir(tmp_path / "trainer", keep=2)

    def fill(step):
        def write(folder: Path) -> None:
            (folder / "model").mkdir()
            (folder / "state.pt").write_bytes(str(step).encode())
        return write

    assert ck.latest() is None
    ck.save(10, fill(10))
    assert ck.latest().name == "step-00000010"
    ck.save(20, fill(20))
    ck.save(30, fill(30))
    assert ck.latest().name == "step-00000030"
    assert sorted(p.name for p in ck.root.iterdir()) == [LATEST, "step-00000020", "step-00000030"]
    # a complete step folder whose switch never happened is not the latest while the pointer is valid
    (ck.root / "step-00000040").mkdir()
    (ck.root / "step-00000040" / "state.pt").write_bytes(b"40")
    assert ck.latest().name == "step-00000030"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that is gone: what a kill leaves
    (ck.root / f".step-00000050.tmp-{dead}-0123abcd").mkdir()
    (ck.root / f".latest.tmp-{dead}-0123abcd").write_text("step-00000050\n")
    (ck.root / f".step-00000060.tmp-{os.getpid()}-0123abcd").mkdir()  # a live writer's: left alone
    assert sorted(p.name for p in ck.clean_stale()) == [f".latest.tmp-{dead}-0123abcd",
                                                        f".step-00000050.tmp-{dead}-0123abcd"]
    (ck.root / f".step-00000060.tmp-{os.getpid()}-0123abcd").rmdir()
    (ck.root / LATEST).unlink()  # no pointer (killed before the first switch): the newest complete folder
    assert ck.latest().name == "step-00000040"


def test_metrics_log_with_a_torn_multibyte_tail_is_resumed(tmp_path):
    """metrics.jsonl cut by a kill in the middle of a UTF-8 character: complete records up to the
    checkpoint are kept, the torn one is dropped, and appending goes on."""
    from gpt2lab.training.records import Metrics

    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "note": "d\u00e9j\u00e0 \u2028 vu"},
               {"step": 3, "loss": 1.2}]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    torn = json.dumps({"step": 4, "note": "\u00e9"}, ensure_ascii=False).encode("utf-8")
    path.write_bytes(body + torn[: torn.index("\u00e9".encode()) + 1])
    metrics = Metrics(path, resume_step=2)
    metrics.write({"step": 3, "loss": 1.25})
    metrics.close()
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    assert [json.loads(line) for line in lines] == [*records[:2], {"step": 3, "loss": 1.25}]
