"""``gpt2lab finetune`` and ``gpt2lab train``: fine-tune a checkpoint or train a model from scratch.

Both run under ``torchrun --nproc_per_node=N`` unchanged (DDP; rank 0 writes).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from .common import note_missing_extra, user_errors
from .options import device_option, dtype_option, threads_option

# Options shared by both commands (typer reads these as metadata; one definition, two signatures).
DATA = typer.Argument(..., help="Training text: .txt files, folders of them, .jsonl, .csv, .json, .jsonl.gz, "
                      ".parquet files, datasets folders (save_to_disk), or a dataset name from the local Hugging "
                      "Face datasets cache; or conversations in .jsonl (messages, conversations or "
                      "prompt/completion records).", show_default=False)
FORMAT = typer.Option("auto", "--format", help="text (language modelling over documents), chat (conversations, "
                      "loss on the assistant's turns) or auto (chat when every file is .jsonl conversations).")
CHAT_TEMPLATE = typer.Option(None, "--chat-template", help="Chat data: a Jinja chat template file to lay "
                             "conversations out with (default: the model's own, else gpt2lab's transcript); "
                             "saved with the model.")
ASSISTANT_ONLY = typer.Option(True, "--assistant-only-loss/--all-tokens-loss", help="Chat data: train on the "
                              "assistant's tokens only (default), or on every token of the conversation.")
OUT = typer.Option(..., "--out", "-o", help="Output folder: the trained model (HF layout), metrics, checkpoints.")
VAL = typer.Option(None, "--val", help="Validation file or folder (default: hold out --val-share of the documents).")
VAL_SHARE = typer.Option(0.05, "--val-share", help="Share of documents held out for validation (0 disables).")
TEXT_FIELD = typer.Option("text", "--text-field", help="Field (column) holding the text in .jsonl, .json, parquet "
                          "files and datasets.")
TEXT_COLUMN = typer.Option("text", "--text-column", help="Column holding the text in .csv files.")
EPOCHS = typer.Option(None, "--epochs", help="Passes over the training blocks (default 1).")
MAX_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps (instead of --epochs).")
BATCH = typer.Option(8, "--batch-size", "-b", help="Blocks per micro-batch (per process).")
ACCUM = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step.")
LR = typer.Option(None, "--lr", help="Peak learning rate (default 1e-4 fine-tune, 1e-3 LoRA, 6e-4 from scratch).")
WARMUP = typer.Option(None, "--warmup-steps", help="Linear warmup steps (default 5% of the run, at most 100).")
WD = typer.Option(0.1, "--weight-decay", help="AdamW weight decay on matrices (not biases/LayerNorm).")
CLIP = typer.Option(1.0, "--grad-clip", help="Clip the gradient norm to this (0 disables).")
BLOCK = typer.Option(None, "--block-size", help="Tokens per training block (default: the model's context).")
DROPOUT = typer.Option(None, "--dropout", help="Dropout rate (default: the model's own).")
EVAL_EVERY = typer.Option(None, "--eval-every", help="Steps between validations (default: ~20 per run).")
EVAL_BLOCKS = typer.Option(200, "--eval-blocks", help="Validation blocks per evaluation (at most).")
SAVE_EVERY = typer.Option(None, "--save-every", help="Steps between resumable checkpoints (default: --eval-every).")
KEEP = typer.Option(1, "--keep-checkpoints", help="Resumable checkpoints kept in OUT/trainer/ (the newest N).")
LOG_EVERY = typer.Option(10, "--log-every", help="Steps between metrics.jsonl records.")
PATIENCE = typer.Option(None, "--patience", help="Early stopping: stop after this many evaluations without a new best.")
RESUME = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint left it.")
SEED = typer.Option(0, "--seed", help="Seed for initialisation, data order and dropout.")
BF16 = typer.Option(False, "--bf16", help="Same as --dtype bfloat16.")
DTYPE = dtype_option(help="Autocast precision (weights and optimizer stay float32): auto (bfloat16 on a GPU "
                     "that supports it, else float32), float32, bfloat16, or float16 (CUDA, with loss scaling).")
COMPILE = typer.Option(False, "--compile", help="torch.compile the model for training (slow first step; "
                       "pays on a GPU for long runs).")
DETERMINISTIC = typer.Option(None, "--deterministic/--no-deterministic",
                             help="Deterministic kernels (default: on for CUDA, where exact --resume needs them).")
CKPT = typer.Option(False, "--grad-checkpointing", help="Recompute activations in backward to save memory.")
SAVE_DTYPE = typer.Option("float32", "--save-dtype", help="Storage dtype of the published model: float32, "
                          "float16 or bfloat16 (resumable checkpoints stay float32).")
MAX_TIME = typer.Option(None, "--max-time", help="Stop cleanly (checkpoint + model) after this many minutes.")
THREADS = threads_option()
DEVICE = device_option()
NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bars (log lines only).")
REPORT_TO = typer.Option([], "--report-to", help="Also log metrics to: tensorboard (event files in OUT/runs/, "
                         "as HF Trainer's report_to). Repeatable; none = off.")


def _run(**settings) -> None:
    with user_errors():
        from ..training import TrainConfig, train

        settings["data"] = [str(p) for p in settings["data"]]
        settings["out"] = str(settings["out"])
        for key in ("val", "chat_template"):
            if settings.get(key) is not None:
                settings[key] = str(settings[key])
        settings["progress"] = not settings.pop("no_progress")
        config = TrainConfig(**settings)
        if config.plot and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 writes the files
            note_missing_extra("train", "the loss curve (loss_curve.png)")
        train(config)


def finetune(
    data: list[Path] = DATA,
    model: str = typer.Option(..., "--model", "-m",
                              help="Model to fine-tune: local directory, bundled name or Hub id."),
    out: Path = OUT, val: Path = VAL, val_share: float = VAL_SHARE, text_field: str = TEXT_FIELD,
    text_column: str = TEXT_COLUMN, format: str = FORMAT, chat_template: Path = CHAT_TEMPLATE,
    assistant_only_loss: bool = ASSISTANT_ONLY,
    epochs: float = EPOCHS, max_steps: int = MAX_STEPS, batch_size: int = BATCH,
    grad_accum: int = ACCUM, lr: float = LR, warmup_steps: int = WARMUP, weight_decay: float = WD,
    grad_clip: float = CLIP, block_size: int = BLOCK, dropout: float = DROPOUT, eval_every: int = EVAL_EVERY,
    eval_blocks: int = EVAL_BLOCKS, save_every: int = SAVE_EVERY, keep_checkpoints: int = KEEP,
    log_every: int = LOG_EVERY,
    patience: int = PATIENCE, resume: bool = RESUME, seed: int = SEED,
    lora_rank: int = typer.Option(0, "--lora-rank", help="Train a LoRA adapter of this rank instead of all weights."),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA scale numerator (default 2 x rank)."),
    lora_targets: str = typer.Option("c_attn", "--lora-targets",
                                     help="Modules to adapt: c_attn, attn.c_proj, c_fc, mlp.c_proj, c_proj."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the LoRA input."),
    bf16: bool = BF16, grad_checkpointing: bool = CKPT, save_dtype: str = SAVE_DTYPE, max_time: float = MAX_TIME,
    threads: int = THREADS, device: str = DEVICE, dtype: str = DTYPE, compile: bool = COMPILE,  # noqa: A002
    deterministic: bool = DETERMINISTIC, no_progress: bool = NO_PROGRESS, report_to: list[str] = REPORT_TO,
) -> None:
    """Fine-tune a GPT-2 checkpoint on your own text (all weights, or a LoRA adapter), or into a chatbot on
    conversations (loss on the assistant's turns; the model is saved with its chat template)."""
    _run(**locals())


def train(
    data: list[Path] = DATA,
    config: str = typer.Option(..., "--config", "-c",
                               help="A preset (gpt2, gpt2-medium, distilgpt2, gpt2-mini, gpt2-tiny, ...) and/or "
                                    "settings: 'n_layer=6,n_head=6,n_embd=384,n_positions=256'."),
    out: Path = OUT, val: Path = VAL, val_share: float = VAL_SHARE, text_field: str = TEXT_FIELD,
    text_column: str = TEXT_COLUMN, format: str = FORMAT, chat_template: Path = CHAT_TEMPLATE,
    assistant_only_loss: bool = ASSISTANT_ONLY,
    epochs: float = EPOCHS, max_steps: int = MAX_STEPS, batch_size: int = BATCH,
    grad_accum: int = ACCUM, lr: float = LR, warmup_steps: int = WARMUP, weight_decay: float = WD,
    grad_clip: float = CLIP, block_size: int = BLOCK, dropout: float = DROPOUT, eval_every: int = EVAL_EVERY,
    eval_blocks: int = EVAL_BLOCKS, save_every: int = SAVE_EVERY, keep_checkpoints: int = KEEP,
    log_every: int = LOG_EVERY,
    patience: int = PATIENCE, resume: bool = RESUME, seed: int = SEED, bf16: bool = BF16,
    grad_checkpointing: bool = CKPT, save_dtype: str = SAVE_DTYPE, max_time: float = MAX_TIME,
    threads: int = THREADS, device: str = DEVICE, dtype: str = DTYPE, compile: bool = COMPILE,  # noqa: A002
    deterministic: bool = DETERMINISTIC, no_progress: bool = NO_PROGRESS, report_to: list[str] = REPORT_TO,
) -> None:
    """Train a GPT-2 model from scratch (GPT-2's tokenizer) on your own text."""
    _run(**locals())
