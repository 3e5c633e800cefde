"""What a training run records: ``metrics.jsonl`` (and TensorBoard scalars), the loss plot, the progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..atomic import naming, write_file
from ..readers import ReadError, complete_lines, iter_jsonl, parse_json

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
# metrics.jsonl key -> TensorBoard tag (the names HF Trainer's TensorBoard callback uses)
_TB_TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "tokens_per_s": "train/tokens_per_second",
            "val_loss": "eval/loss", "val_ppl": "eval/perplexity"}
TENSORBOARD_DIR = "runs"


class Metrics:
    """``metrics.jsonl``: one JSON object per line; on resume, records after the checkpoint are dropped.

    ``tensorboard``: also write each number as a TensorBoard scalar (``torch.utils.tensorboard``) into
    ``runs/`` next to the JSONL; on resume, TensorBoard's ``purge_step`` drops the later events too.
    """

    def __init__(self, path: Path, resume_step: int | None, tensorboard: bool = False) -> None:
        self.path = path
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("--report-to tensorboard needs the tensorboard package: "
                                 "pip install 'gpt2lab[tensorboard]'") from exc
            self.writer = SummaryWriter(str(path.parent / TENSORBOARD_DIR),
                                        purge_step=resume_step + 1 if resume_step is not None else None)
        kept: list[str] = []
        if resume_step is not None and path.is_file():
            for raw, _ in complete_lines(path):  # a last line cut by a kill (even mid-character) is dropped
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                try:
                    rec = parse_json(line, path)
                except ReadError:
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                    kept.append(line)
        write_file(path, "".join(line + "\n" for line in kept))
        self.fh = open(path, "a", encoding="utf-8")  # then appends: one record per line, a torn last one skipped

    def write(self, record: dict) -> None:
        with naming(self.path):  # a full disk: one line naming metrics.jsonl
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
        if self.writer is not None:
            for key, tag in _TB_TAGS.items():
                if key in record:
                    self.writer.add_scalar(tag, record[key], global_step=record["step"])
            self.writer.flush()

    def close(self) -> None:
        with naming(self.path):
            self.fh.close()
        if self.writer is not None:
            self.writer.close()


def plot_losses(metrics_path: Path, png: Path) -> bool:
    """Train and validation loss against step; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, val = [], []
    for _, rec in iter_jsonl(metrics_path, objects=True):
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        write_file(png, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
    return True


class ProgressBar:
    """A rich progress bar with loss, tokens/s and ETA (inactive on other ranks or when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(elapsed_when_finished=True))
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        # in a log file a live bar shows nothing until the end: write plain lines instead
        self.lines = not self.progress.console.is_terminal
        self.progress.start()

    def update(self, step: int, info: str | None = None) -> None:
        if self.enabled:
            if info is None:
                self.progress.update(self.task, completed=step)
            else:
                self.progress.update(self.task, completed=step, info=info)
                if self.lines:
                    task = self.progress.tasks[0]
                    eta = f", ETA {task.time_remaining:.0f} s" if task.time_remaining is not None else ""
                    self.print(f"step {step}/{task.total}: {info}{eta}")

    def print(self, msg: str) -> None:
        if self.enabled:
            self.progress.console.print(msg, highlight=False, markup=False)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
