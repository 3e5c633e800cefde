"""The training loop: fine-tuning or training from scratch, resumable exactly, single- or multi-process.

Exact resume rests on three things: the order of training blocks is a pure function of
``(seed, sample index)`` (no replay needed), the checkpoint holds everything else that evolves
(weights, optimizer, step, RNG states), and every checkpoint is written atomically.

Output folder ``--out``:
    config.json, model.safetensors, tokenizer files   the best model (the last one without validation)
    metrics.jsonl, loss_curve.png, training.json       records
    runs/                                              TensorBoard event files (--report-to tensorboard)
    adapter/                                           the LoRA adapter on its own (LoRA runs)
    trainer/  (step-N/{state.pt,model/} + latest)      resumable checkpoints, for --resume (see checkpoint.py)
    data/                                              the tokenized corpus (uint16 memmaps)

The loop's rooms, named as in transformers' Trainer / nanoGPT / litgpt: :mod:`.sampler` (the block order),
:mod:`.optimization` (AdamW groups, the learning-rate schedule), :mod:`.records` (metrics.jsonl, TensorBoard,
the loss plot, the progress bar), :mod:`.distributed` (ranks and devices under torchrun), :mod:`.checkpoint`
(the resumable checkpoints), :mod:`.config` (the run's settings).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import clean_stale, crash_point, replace_files, write_dir, write_file
from ..checkpoints import save_model
from ..checkpoints.adapters import fill_adapter_dir
from ..checkpoints.io import load_model, write_model_files
from ..generation.chat_format import style_for_model
from ..generation.chat_template import ChatTemplate, read_template_file
from ..model import GPT2
from ..model.lora import adapter_state, apply_lora, load_adapter_state, merge_lora
from ..outputs import check_output_dir
from ..placement import DTYPES, autocast_dtype, set_threads
from .chat_data import (
    IGNORE_INDEX,
    ConversationData,
    ConversationSampler,
    default_system_message,
    looks_like_chat,
    prepare_chat_data,
    with_default_system_message,
)
from .checkpoint import MODEL_DIR, STATE_FILE, CheckpointDir
from .config import RESUME_IDENTITY, TrainConfig, default_learning_rate, parse_model_config
from .data import DataError, TokenData, prepare_data
from .distributed import init_distributed
from .optimization import lr_at, make_optimizer
from .records import METRICS_FILE, PLOT_FILE, Metrics, ProgressBar, plot_losses
from .sampler import BlockSampler, val_blocks

TRAINER_DIR = "trainer"


@dataclass
class TrainResult:
    out: Path
    steps: int
    best_val_loss: float | None
    last_train_loss: float | None
    stopped: str  # "max_steps", "early_stopping", "max_time", "signal"


# -- the model -----------------------------------------------------------------------------------------
def _set_dropout(model: GPT2, p: float) -> None:
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, name, p)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if hasattr(module, "attn_dropout"):
            module.attn_dropout = p


def build_model(cfg: TrainConfig):
    """(model, tokenizer, tokenizer_dir, name, generation_config) for a fine-tune or a fresh model."""
    from ..tokenizer import Tokenizer, gpt2_tokenizer_dir

    if cfg.model is not None:
        from ..generation import load

        gen = load(cfg.model, device="cpu", dtype="float32")  # fp32 master weights; autocast does the rest
        model, tokenizer, tok_dir, name = gen.model, gen.tokenizer, gen.tokenizer_dir, gen.name
        generation_config = gen.generation_config
    else:
        config = parse_model_config(cfg.config)
        tokenizer, tok_dir = Tokenizer.gpt2(), gpt2_tokenizer_dir()
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"--config: vocab_size={config.vocab_size} is smaller than GPT-2's tokenizer "
                             f"({tokenizer.vocab_size} tokens)")
        model = GPT2(config)
        model.init_weights(seed=cfg.seed)
        name, generation_config = None, {}
    if cfg.dropout is not None:
        _set_dropout(model, cfg.dropout)
    return model, tokenizer, tok_dir, name, generation_config


# -- the trainer ---------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        if cfg.threads:
            set_threads(cfg.threads, "--threads")
        self.dist, self.device = init_distributed(cfg.device)
        self.deterministic = cfg.deterministic if cfg.deterministic is not None else self.device.type == "cuda"
        if self.deterministic and self.device.type == "cuda":
            # exact resume on a GPU: fixed cuBLAS workspaces, set before cuBLAS starts (as torch's
            # reproducibility notes ask); the deterministic kernels are switched on for the run (train())
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # None: plain float32; bfloat16: autocast; float16: autocast + a gradient scaler (CUDA only)
        self.amp_dtype = autocast_dtype("bfloat16" if cfg.bf16 else cfg.dtype, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.out = Path(cfg.out)
        self.quiet = not self.dist.main
        if cfg.model is not None and Path(cfg.model).is_dir() and Path(cfg.model).resolve() == self.out.resolve():
            raise ValueError(f"--out {cfg.out} is the model being fine-tuned; choose another output folder")
        self.checkpoints = CheckpointDir(self.out / TRAINER_DIR, keep=cfg.keep_checkpoints)
        if self.dist.main:  # before any long work: an unwritable --out fails now, not after an hour
            check_output_dir(self.out)
            clean_stale(self.out)  # what a killed write left: temporary copies of files and folders
            self.checkpoints.clean_stale()
        if not cfg.resume and self.checkpoints.latest() is not None:
            self._log(f"gpt2lab: {self.out} holds an earlier run; starting over (--resume continues it instead)")
        model, self.tokenizer, self.tokenizer_dir, self.base_name, self.generation_config = build_model(cfg)
        c = model.config
        self.block_size = cfg.block_size or c.n_positions
        if self.block_size > c.n_positions:
            raise ValueError(f"--block-size {self.block_size} exceeds the model's context "
                             f"(n_positions={c.n_positions})")
        self.lora_targets = cfg.lora_targets
        if cfg.lora_rank:
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank, cfg.lora_targets,
                       cfg.lora_dropout, seed=cfg.seed)
        self.model = model.to(self.device)
        self.chat_template = self._chat_template()  # None: plain causal LM over documents
        self.default_system: str | None = None
        if self.chat_template is not None:  # the data's system message: the model's default (chat_data)
            self.default_system, note = default_system_message(cfg.data)
            if self.default_system is not None:
                self.chat_template = with_default_system_message(self.chat_template, self.default_system)
                self._log(f"gpt2lab: default system message: {note}; the model gets it when a conversation "
                          "has none (gpt2lab chat without --persona, the server, review make)")
        if self.chat_template is None:
            self.data = self._load_data()
            self.sampler = BlockSampler(self.data.train, self.block_size, cfg.seed)
            if self.sampler.n_blocks < 1:
                raise DataError(f"the training text has {len(self.data.train)} tokens, fewer than one block of "
                                f"--block-size {self.block_size} (+1); give more text or a smaller --block-size")
            self.val = val_blocks(self.data.val, self.block_size, cfg.eval_blocks) if self.data.val is not None \
                else []
            n_samples = self.sampler.n_blocks
        else:
            self.data = self._load_chat_data()
            self.sampler = ConversationSampler(self.data.train, cfg.seed, cfg.assistant_only_loss,
                                               self.tokenizer.eos_token_id or 0)
            n_val = len(self.data.val) if self.data.val is not None else 0
            self.val = [(int(i), 0) for i in np.unique(np.linspace(0, n_val - 1, min(n_val, cfg.eval_blocks))
                                                       .round().astype(np.int64))] if n_val else []
            n_samples = self.sampler.n_samples
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        if cfg.max_steps is not None:
            self.max_steps = cfg.max_steps
        else:
            self.max_steps = max(1, math.ceil((cfg.epochs or 1.0) * n_samples / self.global_batch))
        if cfg.lr:
            self.lr = cfg.lr
        else:  # by the model's size, said in the run's first lines
            self.lr, why = default_learning_rate(model.config, fine_tune=cfg.model is not None,
                                                 lora=bool(cfg.lora_rank))
            self._log(f"gpt2lab: learning rate {self.lr:.2g} ({why}; --lr to choose)")
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, self.max_steps // 20)
        self.eval_every = cfg.eval_every or max(1, self.max_steps // 20)
        self.save_every = cfg.save_every or self.eval_every
        self.optimizer = make_optimizer(self.model, cfg, self.lr, self.device)
        self.step = 0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.step_tokens = 0  # inputs fed by this rank in the last step

    # -- setup helpers ---------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    def _load_data(self) -> TokenData:
        kwargs = dict(tokenizer=self.tokenizer, val=self.cfg.val, val_share=self.cfg.val_share,
                      text_field=self.cfg.text_field, text_column=self.cfg.text_column, seed=self.cfg.seed,
                      log=self._log)
        cache = self.out / "data"
        data = None
        if self.dist.main:  # rank 0 tokenizes; the others open its cache
            data = prepare_data(self.cfg.data, cache, progress=self.cfg.progress, **kwargs)
        self.dist.barrier()
        if data is None:
            data = prepare_data(self.cfg.data, cache, progress=False, **kwargs)
        return data

    def _chat_template(self) -> ChatTemplate | None:
        """The template of a chat run (``--chat-template``, else the model's own, else gpt2lab's layout),
        or None when the data is plain text (``--format text``, or ``auto`` and not conversations)."""
        cfg = self.cfg
        if cfg.format == "text" or (cfg.format == "auto" and cfg.chat_template is None
                                    and not looks_like_chat(cfg.data)):
            return None
        if cfg.chat_template is not None:
            # a file that cannot be read, or a template that does not compile, breaks the sandbox or its
            # bounds: ChatTemplateFault naming it
            origin = f"--chat-template {cfg.chat_template}"
            return ChatTemplate(read_template_file(cfg.chat_template, origin), origin=origin)
        return style_for_model(self.base_name, Path(cfg.model) if cfg.model and Path(cfg.model).is_dir()
                               else self.tokenizer_dir).chat_template

    def _load_chat_data(self) -> ConversationData:
        kwargs = dict(tokenizer=self.tokenizer, template=self.chat_template, max_tokens=self.block_size + 1,
                      val=self.cfg.val, val_share=self.cfg.val_share, seed=self.cfg.seed, log=self._log)
        data = None
        if self.dist.main:
            data = prepare_chat_data(self.cfg.data, self.out / "data", **kwargs)
        self.dist.barrier()
        if data is None:
            data = prepare_chat_data(self.cfg.data, self.out / "data", **kwargs)
        return data

    def _identity(self) -> dict:
        d = self.cfg.to_dict()
        ident = {k: d[k] for k in RESUME_IDENTITY}
        ident["betas"] = list(ident["betas"])
        ident["dtype"] = str(self.amp_dtype or torch.float32).removeprefix("torch.")  # what "auto" resolved to
        ident.update(max_steps=self.max_steps, world_size=self.dist.world, global_batch=self.global_batch)
        return ident

    # -- checkpoints -----------------------------------------------------------------------------
    def _plain_model(self) -> GPT2:
        """The model to publish: itself, or a merged copy when it carries LoRA adapters."""
        if not self.cfg.lora_rank:
            return self.model
        import copy

        return merge_lora(copy.deepcopy(self.model))

    @property
    def _template_source(self) -> str | None:
        """The chat template a chat run's model is saved with (it was trained on that layout)."""
        return self.chat_template.source if self.chat_template is not None else None

    def save_checkpoint(self) -> None:
        """``trainer/``: the latest weights (HF layout) and everything needed to continue exactly."""
        state = {
            "step": self.step, "best_val": self.best_val, "bad_evals": self.bad_evals,
            "tokens_seen": self.tokens_seen, "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "lr": self.lr, "warmup": self.warmup,
                          "max_steps": self.max_steps, "min_lr_ratio": self.cfg.min_lr_ratio},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
            # the data position: the next global sample index (the order itself is a function of seed)
            "data": {"next_sample": self.step * self.global_batch, "seed": self.cfg.seed},
            "identity": self._identity(),
            "adapter": adapter_state(self.model) if self.cfg.lora_rank else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        plain = self._plain_model()

        def fill(tmp: Path) -> None:
            save_model(plain, tmp / MODEL_DIR, tokenizer_dir=self.tokenizer_dir, chat_template=self._template_source)
            crash_point("checkpoint.writing")
            with open(tmp / STATE_FILE, "wb") as fh:  # a file object: a full disk surfaces as the OSError it is
                torch.save(state, fh)

        self.checkpoints.save(self.step, fill)

    def model_card(self, dtype: torch.dtype) -> str:
        """The README.md of the published model: base model, data, steps, validation perplexity, how."""
        from ..checkpoints.card import model_card

        cfg = self.cfg
        if cfg.lora_rank:
            how = (f"Fine-tuned with `gpt2lab finetune` as a LoRA adapter (rank {cfg.lora_rank}, targets "
                   f"{self.lora_targets}), merged into the base weights; the adapter alone is in `adapter/` "
                   "(peft's format).")
        elif cfg.model is not None:
            how = "Fine-tuned (all weights) with `gpt2lab finetune`."
        else:
            how = f"Trained from scratch with `gpt2lab train --config {cfg.config}`."
        details: dict[str, object] = {"peak learning rate": self.lr, "block size": self.block_size,
                                      "global batch (blocks)": self.global_batch, "seed": cfg.seed}
        if self.chat_template is not None:
            details["data format"] = ("chat conversations, laid out by the chat template saved in "
                                      "tokenizer_config.json; loss on "
                                      + ("the assistant's tokens" if cfg.assistant_only_loss else "every token")
                                      + "; validation loss over the assistant's tokens")
            if self.default_system is not None:
                details["default system message"] = repr(self.default_system)
        return model_card(how=how, config=self.model.config, dtype=dtype, base_model=self.base_name,
                          data=cfg.data, steps=self.step, val_loss=self.best_val, details=details)

    def publish(self) -> None:
        """The model at the top of ``--out`` (HF layout; each file replaced atomically)."""
        plain = self._plain_model()
        dtype = DTYPES[self.cfg.save_dtype]
        replace_files(self.out, lambda tmp: write_model_files(
            plain, tmp, tokenizer_dir=self.tokenizer_dir, dtype=dtype, card=self.model_card(dtype),
            generation_config=self.generation_config, chat_template=self._template_source), scope="publish")
        if self.cfg.lora_rank:
            # a local base is recorded as an absolute path, so the adapter folder finds it from anywhere
            base = str(Path(self.base_name).resolve()) if self.base_name and Path(self.base_name).is_dir() \
                else self.base_name
            write_dir(self.out / "adapter", lambda tmp: fill_adapter_dir(
                self.model, tmp, base, self.lora_targets), scope="adapter")

    def load_checkpoint(self) -> bool:
        folder = self.checkpoints.latest()
        if folder is None:
            self._log(f"gpt2lab: nothing to resume in {self.out} yet; starting from step 0")
            return False
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)  # cannot run code
        saved, now = state["identity"], self._identity()
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            detail = "; ".join(f"{k}: was {saved.get(k)!r}, now {now[k]!r}" for k in diff)
            raise ValueError(f"--resume: the run in {self.out} used different settings ({detail})")
        if self.cfg.lora_rank:
            load_adapter_state(self.model, {k: v.to(self.device) for k, v in state["adapter"].items()})
        else:
            weights = load_model(folder / MODEL_DIR).state_dict()
            self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.best_val, self.bad_evals = state["step"], state["best_val"], state["bad_evals"]
        self.tokens_seen = state["tokens_seen"]
        self._log(f"gpt2lab: resuming {self.out} at step {self.step}/{self.max_steps}")
        return True

    # -- evaluation ------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss per token over the validation blocks (all ranks, summed exactly)."""
        if not self.val:
            return None
        model = self.model
        model.eval()
        mine = self.val[self.dist.rank::self.dist.world]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x, y in self._val_batches(mine):
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            total += torch.stack([loss.double(), (y != IGNORE_INDEX).sum().double()])
        if self.dist.world > 1:
            torch.distributed.all_reduce(total)
        model.train()
        return float(total[0] / total[1])

    def _val_batches(self, mine: list[tuple[int, int]]):
        """(inputs, labels) batches over this rank's validation items: text blocks grouped by length, or
        conversations (labels on the assistant's tokens only, whatever the training loss covers)."""
        bs = self.cfg.batch_size
        for i in range(0, len(mine), bs):
            chunk = mine[i:i + bs]
            if self.chat_template is not None:
                yield self.data.val.rows([c for c, _ in chunk], True, self.tokenizer.eos_token_id or 0)
                continue
            by_len: dict[int, list[int]] = {}
            for start, length in chunk:
                by_len.setdefault(length, []).append(start)
            for length, starts in by_len.items():
                rows = torch.from_numpy(np.stack([self.data.val[s:s + length + 1].astype(np.int64) for s in starts]))
                yield rows[:, :-1], rows[:, 1:]

    def _batch(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of the micro-batch starting at global sample index ``first``."""
        if self.chat_template is not None:
            x, y = self.sampler.batch(first, self.cfg.batch_size)
        else:
            rows = self.sampler.batch(first, self.cfg.batch_size)
            x, y = rows[:, :-1], rows[:, 1:]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run the loop to the end (or a stop); the deterministic-kernel setting is restored afterwards."""
        before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        if self.deterministic and self.device.type == "cuda":
            # strict mode, not warn_only: only then does SDPA's flash backward take its deterministic path
            torch.use_deterministic_algorithms(True)
        try:
            return self._train()
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])

    def _train(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        resumed = self.load_checkpoint() if cfg.resume else False
        if not resumed:
            torch.manual_seed(cfg.seed + dist.rank)  # dropout streams; restored from the checkpoint on resume
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_file(self.out / "training.json", json.dumps(
                {"settings": cfg.to_dict(), "max_steps": self.max_steps, "lr": self.lr, "warmup": self.warmup,
                 "global_batch": self.global_batch, "world_size": dist.world, "base_model": self.base_name,
                 "train_tokens": int(self.data.meta["train_tokens"]), "val_tokens": int(self.data.meta["val_tokens"]),
                 **({"format": "chat", "chat_template": self.chat_template.source,
                     "train_conversations": self.data.meta["train_conversations"],
                     "val_conversations": self.data.meta["val_conversations"],
                     "loss_on": self._loss_on("train")["loss_on"], "val_loss_on": "assistant_tokens"}
                    if self.chat_template is not None else {"format": "text"}),
                 "parameters": sum(p.numel() for p in self.model.parameters()),
                 "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)},
                indent=2, default=str) + "\n")
        metrics = Metrics(self.out / METRICS_FILE, self.step if resumed else None,
                          tensorboard="tensorboard" in cfg.report_to) if dist.main else None
        self.model.gradient_checkpointing = cfg.grad_checkpointing
        self.model.train()
        net: nn.Module = self.model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                          else None)
        if cfg.compile:  # after DDP, as torch's DDP + compile notes advise
            net = torch.compile(net)
        params = [p for p in self.model.parameters() if p.requires_grad]
        stop_signal: list[int] = []
        handlers = {}
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda s, f: stop_signal.append(s))
        bar = ProgressBar(cfg.progress and dist.main, self.max_steps, self.step)
        t_start = time.monotonic()
        stopped = "max_steps"
        tokens_per_step = self.global_batch * self.block_size
        window_t, window_tokens = time.monotonic(), 0
        try:
            if not resumed and self.val:
                val = self.evaluate()
                self._record_eval(val, metrics, bar, save_best=False)
            while self.step < self.max_steps:
                lr = lr_at(self.step, self.lr, self.warmup, self.max_steps, cfg.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = self.optimizer_step(net, params)
                self.step += 1
                if self.chat_template is not None:  # rows are conversations: count what this rank fed
                    tokens_per_step = self.step_tokens * dist.world
                self.tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                stop_now = self._should_stop(t_start, stop_signal)
                if self.step % cfg.log_every == 0 or self.step == self.max_steps or stop_now:
                    loss_avg = loss_sum / cfg.grad_accum
                    if dist.world > 1:
                        torch.distributed.all_reduce(loss_avg)
                        loss_avg /= dist.world
                    self.last_loss = float(loss_avg)
                    now = time.monotonic()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    if metrics:
                        metrics.write({"step": self.step, "loss": round(self.last_loss, 6), "lr": lr,
                                       "tokens": self.tokens_seen, "tokens_per_s": round(tps, 1),
                                       "time_s": round(now - t_start, 2), **self._loss_on("train")})
                    bar.update(self.step, f"loss {self.last_loss:.4f}  {tps:,.0f} tok/s")
                else:
                    bar.update(self.step)
                if self.step % self.eval_every == 0 or self.step == self.max_steps or stop_now:
                    if self.val:
                        if self._record_eval(self.evaluate(), metrics, bar, save_best=True):
                            stopped, stop_now = "early_stopping", True
                if self.step % self.save_every == 0 or self.step == self.max_steps or stop_now:
                    if dist.main:
                        self.save_checkpoint()
                        if not self.val:
                            self.publish()
                        if metrics and cfg.plot:
                            plot_losses(metrics.path, self.out / PLOT_FILE)
                    dist.barrier()
                if stop_now:
                    if stopped == "max_steps":
                        stopped = "signal" if stop_signal else "max_time"
                    break
        finally:
            bar.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if metrics:
                metrics.close()
        if dist.main:
            bar.print(f"gpt2lab: stopped at step {self.step}/{self.max_steps} ({stopped}); model in {self.out}"
                      + (f", best validation loss {self.best_val:.4f}" if self.best_val is not None else ""))
        return TrainResult(out=self.out, steps=self.step, best_val_loss=self.best_val, last_train_loss=self.last_loss,
                           stopped=stopped)

    def optimizer_step(self, net: nn.Module, params: list[torch.Tensor]) -> torch.Tensor:
        """One optimizer step at ``self.step``: the micro-batches of this rank, clipping, AdamW.

        The loss is the mean over every labelled token of the step -- all micro-batches on all ranks
        (the count is summed first) -- so the gradient does not depend on how the step is split into
        micro-batches and processes, even when rows carry different numbers of labels (chat data).
        Returns this rank's share scaled so that the loop's average over micro-batches and ranks is that
        mean; no device sync.
        """
        cfg, dist = self.cfg, self.dist
        loss_sum = torch.zeros((), device=self.device)
        batches = [self._batch(self.step * self.global_batch + (micro * dist.world + dist.rank) * cfg.batch_size)
                   for micro in range(cfg.grad_accum)]
        count = sum((y != IGNORE_INDEX).sum() for _, y in batches).double()
        if dist.world > 1:
            torch.distributed.all_reduce(count)
        scale = dist.world / count.clamp(min=1).float()  # DDP averages gradients over the ranks
        self.step_tokens = sum(int(x.numel()) for x, _ in batches)
        for micro, (x, y) in enumerate(batches):
            sync = dist.world == 1 or micro == cfg.grad_accum - 1
            with (nullcontext() if sync else net.no_sync()), self._autocast():
                logits = net(x)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum") * scale
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum * cfg.grad_accum

    def _should_stop(self, t_start: float, stop_signal: list[int]) -> bool:
        over = bool(stop_signal) or (self.cfg.max_time is not None
                                     and time.monotonic() - t_start > self.cfg.max_time * 60)
        if self.dist.world > 1:  # every rank must stop at the same step
            flag = torch.tensor([1.0 if over else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item())
        return over

    def _loss_on(self, split: str) -> dict:
        """What a chat run's losses average over (text runs: every token, said by nothing)."""
        if self.chat_template is None:
            return {}
        return {"loss_on": "assistant_tokens" if split == "val" or self.cfg.assistant_only_loss else "all_tokens"}

    def _record_eval(self, val: float | None, metrics: Metrics | None, bar: ProgressBar, save_best: bool) -> bool:
        """Log a validation result, publish a new best; True when early stopping says stop."""
        if val is None:
            return False
        ppl = math.exp(min(val, 50.0))
        what = " (assistant tokens)" if self.chat_template is not None else ""
        if metrics:
            metrics.write({"step": self.step, "val_loss": round(val, 6), "val_ppl": round(ppl, 4),
                           **self._loss_on("val")})
        if not save_best:  # the starting point: logged, not a candidate for "best"
            if self.dist.main:
                bar.print(f"step {self.step}: validation loss{what} {val:.4f} (perplexity {ppl:.2f})")
            return False
        improved = self.best_val is None or val < self.best_val
        if self.dist.main:
            bar.print(f"step {self.step}: validation loss{what} {val:.4f} (perplexity {ppl:.2f})"
                      + (f", train loss {self.last_loss:.4f}" if self.last_loss is not None else "")
                      + (" (best)" if improved else ""))
        if improved:
            self.best_val, self.bad_evals = val, 0
            if save_best and self.dist.main:
                self.publish()
            self.dist.barrier()
            return False
        self.bad_evals += 1
        return self.cfg.patience is not None and self.bad_evals >= self.cfg.patience


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig) -> TrainResult:
    """Run training as described by ``cfg`` (see :class:`TrainConfig`)."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        if trainer.dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
