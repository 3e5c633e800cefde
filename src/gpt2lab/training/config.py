"""Settings of a training run, and ``--config`` strings for models trained from scratch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# GPT-2 family shapes (vocabulary 50257, context 1024 unless overridden)
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256),
    "gpt2-tiny": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256),
}
# the anchor of the fine-tuning default: full fine-tuning GPT-2 124M (12 layers of width 768) at 1e-4
FINE_TUNE_LR, FINE_TUNE_WIDTH, FINE_TUNE_DEPTH = 1e-4, 768, 12
LORA_LR = 1e-3
REPORT_TO = ("tensorboard",)


def parse_model_config(spec: str):
    """``"gpt2-tiny,n_layer=6"`` or ``"n_layer=4,n_head=4,n_embd=256,n_positions=256"`` -> GPT2Config.

    Items without ``=`` name a preset (applied first); ``dropout=X`` sets all three dropout rates.
    """
    from ..model import GPT2Config

    known = {f.name: f for f in fields(GPT2Config)}
    values: dict[str, object] = {}
    overrides: dict[str, object] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            if item not in PRESETS:
                raise ValueError(f"--config: unknown preset {item!r}; presets: {', '.join(PRESETS)}")
            values.update(PRESETS[item])
            continue
        key, _, raw = (x.strip() for x in item.partition("="))
        if key == "dropout":
            for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
                overrides[name] = _number(key, raw, float)
            continue
        if key not in known:
            raise ValueError(f"--config: unknown setting {key!r}; settings: dropout, {', '.join(known)}")
        default = getattr(GPT2Config, key, None)
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--config: {key} must be true or false, got {raw!r}")
            overrides[key] = raw.lower() in ("true", "1")
        elif isinstance(default, float):
            overrides[key] = _number(key, raw, float)
        elif isinstance(default, int) or key == "n_inner":
            overrides[key] = _number(key, raw, int)
        else:
            overrides[key] = raw
    values.update(overrides)
    if not values:
        raise ValueError("--config is empty; give a preset or n_layer=..,n_head=..,n_embd=..")
    return GPT2Config(**values)


def _number(key: str, raw: str, kind: type) -> int | float:
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"--config: {key} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") \
            from None


def non_embedding_parameters(config) -> int:
    """GPT-2's parameters outside the embeddings: ``12 * n_layer * n_embd**2`` (attention and MLP weights,
    as Kaplan et al. 2020 count N; biases and layer norms left out)."""
    return 12 * config.n_layer * config.n_embd ** 2


def default_learning_rate(config, *, fine_tune: bool, lora: bool) -> tuple[float, str]:
    """The peak learning rate of a run that gives none, for the model of ``config`` (a GPT2Config), and
    why (said in the run's first lines).

    - From scratch: Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", the fit in their
      appendix D.3) of the best learning rate to the non-embedding parameter count N,
      ``0.003239 - 0.0001395 * ln N``: 6.9e-4 for GPT-2 124M's size, 1.2e-3 for a 6-layer width-192
      model; clipped to [1e-4, 3e-3].
    - Full fine-tuning: 1e-4 for GPT-2 124M, scaled by ``768 * 12 / (n_embd * n_layer)``: Adam's best
      rate falls as 1/width (muP, Yang et al. 2021, "Tensor Programs V"), and every block's update adds to
      the same residual stream, so a model half as deep takes steps twice as large for the same change;
      8e-4 for a 6-layer width-192 model, 1.2e-5 for GPT-2 XL; clipped to [1e-5, 1e-3]. A small model
      at GPT-2's 1e-4 learns a new task's form but not its rule in a few hundred steps.
    - LoRA: 1e-3 (the adapters start at zero and are few).
    """
    if lora:
        return LORA_LR, "the LoRA default"
    if not fine_tune:
        n = non_embedding_parameters(config)
        lr = float(f"{min(max(0.003239 - 0.0001395 * math.log(n), 1e-4), 3e-3):.2g}")
        return lr, (f"from scratch, for {n / 1e6:.3g}M non-embedding parameters: Kaplan et al. 2020's fit "
                    "0.003239 - 0.0001395 ln N")
    scale = FINE_TUNE_WIDTH * FINE_TUNE_DEPTH / (config.n_embd * config.n_layer)
    lr = float(f"{min(max(FINE_TUNE_LR * scale, 1e-5), 1e-3):.2g}")
    clipped = "" if 1e-5 <= FINE_TUNE_LR * scale <= 1e-3 else ", clipped"
    return lr, (f"fine-tuning {config.n_layer} layers of width {config.n_embd}: {FINE_TUNE_LR:g} (GPT-2 124M's) "
                f"x 768*12/({config.n_embd}*{config.n_layer}){clipped}")


@dataclass
class TrainConfig:
    """Everything that defines a run. ``model`` fine-tunes a checkpoint; ``config`` trains from scratch."""

    data: list[str]
    out: str
    model: str | None = None
    config: str | None = None
    val: str | None = None
    val_share: float = 0.05
    text_field: str = "text"
    text_column: str = "text"
    format: str = "auto"  # "text" (causal LM over documents), "chat" (conversations), "auto" (by the data)
    chat_template: str | None = None  # a Jinja file for chat data (default: the model's own, else gpt2lab's)
    assistant_only_loss: bool = True  # chat data: loss on the assistant's tokens only
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # default: by the model's size (default_learning_rate)
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 5% of the steps, at most 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    block_size: int | None = None  # default: the model's context
    dropout: float | None = None  # default: the model's own
    eval_every: int | None = None  # default: about 20 evaluations per run
    eval_blocks: int = 200
    save_every: int | None = None  # default: every evaluation
    keep_checkpoints: int = 1  # resumable checkpoints kept in trainer/ (the newest N)
    log_every: int = 10
    patience: int | None = None
    resume: bool = False
    seed: int = 0
    lora_rank: int = 0
    lora_alpha: float | None = None  # default: 2 * rank
    lora_targets: str = "c_attn"
    lora_dropout: float = 0.0
    bf16: bool = False  # the older spelling of dtype="bfloat16"
    dtype: str = "auto"  # autocast: auto (bf16 on a GPU that has it, else float32), float32, bfloat16, float16
    compile: bool = False  # torch.compile the training forward/backward
    deterministic: bool | None = None  # deterministic kernels (None: on for CUDA, which exact resume needs)
    grad_checkpointing: bool = False
    save_dtype: str = "float32"
    max_time: float | None = None  # minutes
    threads: int | None = None
    device: str = "auto"
    progress: bool = True
    plot: bool = True
    report_to: list[str] = field(default_factory=list)  # integrations, as HF Trainer's report_to: "tensorboard"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not self.data:
            raise ValueError("give at least one training file or folder")
        if (self.model is None) == (self.config is None):
            raise ValueError("give exactly one of --model (fine-tune) or --config (train from scratch)")
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give --epochs or --max-steps, not both")
        checks = [
            ("--batch-size", self.batch_size, 1), ("--grad-accum", self.grad_accum, 1),
            ("--eval-blocks", self.eval_blocks, 1), ("--log-every", self.log_every, 1),
            ("--max-steps", self.max_steps, 1), ("--block-size", self.block_size, 1),
            ("--eval-every", self.eval_every, 1), ("--save-every", self.save_every, 1),
            ("--keep-checkpoints", self.keep_checkpoints, 1),
            ("--patience", self.patience, 1), ("--threads", self.threads, 1),
            ("--warmup-steps", self.warmup_steps, 0), ("--lora-rank", self.lora_rank, 0),
        ]
        for name, value, low in checks:
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("--epochs", self.epochs), ("--lr", self.lr), ("--max-time", self.max_time),
                            ("--lora-alpha", self.lora_alpha)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("--val-share", self.val_share), ("--dropout", self.dropout),
                            ("--lora-dropout", self.lora_dropout), ("--min-lr-ratio", self.min_lr_ratio)):
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("--weight-decay and --grad-clip must be >= 0")
        from ..placement import device_name, dtype_name  # (imports torch, which training needs next anyway)

        self.save_dtype = dtype_name(self.save_dtype, "--save-dtype", auto=False)
        self.device = device_name(self.device, "--device")
        self.dtype = dtype_name(self.dtype, "--dtype")
        if self.format not in ("auto", "text", "chat"):
            raise ValueError(f"--format must be auto, text or chat, got {self.format!r}")
        if self.chat_template is not None and self.format == "text":
            raise ValueError("--chat-template is for chat data; it cannot be used with --format text")
        if self.bf16 and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(f"--bf16 asks for bfloat16 but --dtype is {self.dtype}; give one of them")
        if isinstance(self.report_to, str):
            self.report_to = [r.strip() for r in self.report_to.split(",") if r.strip()]
        self.report_to = [r for r in self.report_to if r != "none"]
        bad = sorted(set(self.report_to) - set(REPORT_TO))
        if bad:
            raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)} or none, got {', '.join(bad)}")
        if self.lora_rank and self.model is None:
            raise ValueError("LoRA adapts an existing model: use it with finetune --model, not train --config")

    def to_dict(self) -> dict:
        return asdict(self)


# settings that must not change when a run is resumed (others, like --max-time, may)
RESUME_IDENTITY = ("model", "config", "data", "val", "val_share", "text_field", "text_column", "format",
                   "chat_template", "assistant_only_loss", "batch_size",
                   "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "grad_clip",
                   "block_size", "dropout", "seed", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout",
                   "bf16", "eval_blocks", "dtype")
