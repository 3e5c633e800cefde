"""Chat fine-tuning: conversation records, assistant-only labels (token by token against the template's
spans), turn-boundary truncation, LoRA + kill/resume, DDP, and a synthetic rule learned by the bundled
model -- with masking clearly better than training on every token."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import gpt2lab
from gpt2lab.cli.main import app
from gpt2lab.generation.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, load_chat_template
from gpt2lab.tokenizer import Tokenizer
from gpt2lab.training.chat_data import (
    IGNORE_INDEX,
    ConversationSplit,
    encode_conversation,
    fit_conversation,
    looks_like_chat,
    prepare_chat_data,
    read_conversations,
)
from gpt2lab.training.data import DataError, DataStats

from .conftest import sigkill_after_first_checkpoint
from .test_chat_template import CHATML

TOK = Tokenizer.gpt2()
MULTI = [{"role": "system", "content": "You answer briefly."},
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy?\n\nPlease."},
         {"role": "assistant", "content": "Rome, the eternal city."},
         {"role": "user", "content": "Thanks!"},
         {"role": "assistant", "content": "You're welcome 😀"}]
# the synthetic task: three random words from the user, the same words reversed from the assistant
WORDS = ["apple", "river", "stone", "cloud", "forest", "music", "window", "horse", "bread", "silver", "paper",
         "green", "house", "water", "fire", "king", "bird", "tree", "night", "light", "road", "ship", "gold",
         "door", "hand", "book", "star", "moon", "rain", "wind", "sword", "rose", "wolf", "bell"]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("source", [DEFAULT_CHAT_TEMPLATE, CHATML], ids=["default", "chatml"])
def test_labels_are_exactly_the_assistant_tokens(source):
    template = ChatTemplate(source)
    ids, mask, text, spans = encode_conversation(MULTI, template, TOK.encode)
    assert TOK.decode(ids) == text and len(ids) == len(mask)
    assert len(spans) == 3
    for (start, end), message in zip(spans, [m for m in MULTI if m["role"] == "assistant"]):
        assert message["content"].strip() in text[start:end]
        assert text[start:end].endswith(template.end_of_turn.rstrip("\n") or "\n")
    # runs of masked tokens, token by token, are the spans: nothing more, nothing less
    runs, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [TOK.decode(run) for run in runs] == [text[s:e] for s, e in spans]
    # each span is tokenized alone, and the prompt parts as inference tokenizes them
    assert [len(run) for run in runs] == [len(TOK.encode(text[s:e])) for s, e in spans]
    prompt = template.render(MULTI[:4], add_generation_prompt=True)
    assert ids[:len(TOK.encode(prompt))] == TOK.encode(prompt)
    # labels: the next token where it is the assistant's, ignored elsewhere; all tokens without masking
    split = ConversationSplit(np.asarray(ids, dtype=np.uint16), np.asarray(mask, dtype=np.uint8),
                              np.array([0]), np.array([len(ids)]))
    x, y = split.rows([0], assistant_only=True, pad_id=0)
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    assert split.rows([0], assistant_only=False, pad_id=0)[1][0].tolist() == ids[1:]


def test_padding_keeps_conversations_apart():
    a = encode_conversation(MULTI[:3], ChatTemplate(DEFAULT_CHAT_TEMPLATE), TOK.encode)[:2]
    b = encode_conversation(MULTI, ChatTemplate(DEFAULT_CHAT_TEMPLATE), TOK.encode)[:2]
    tokens = np.asarray(a[0] + b[0], dtype=np.uint16)
    mask = np.asarray(a[1] + b[1], dtype=np.uint8)
    split = ConversationSplit(tokens, mask, np.array([0, len(a[0])]), np.array([len(a[0]), len(b[0])]))
    x, y = split.rows([0, 1], assistant_only=False, pad_id=50256)
    assert x.shape == (2, len(b[0]) - 1)
    assert (y[0, len(a[0]) - 1:] == IGNORE_INDEX).all()  # padding carries no loss, and no target of b
    assert (x[0, len(a[0]) - 1:] == 50256).all()


def test_conversation_formats_and_errors(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [
        {"messages": MULTI[:3]},
        {"conversations": [{"from": "system", "value": "You answer briefly."},
                           {"from": "human", "value": "What is the capital of France?"},
                           {"from": "gpt", "value": "Paris."}]},
        {"prompt": "What is the capital of France?", "completion": "Paris."},
    ])
    read = [m for _, m in read_conversations(good, DataStats())]
    assert read[0] == read[1] == MULTI[:3] and read[2] == MULTI[1:3]
    assert looks_like_chat([good]) and looks_like_chat([tmp_path])
    (tmp_path / "plain.jsonl").write_text('{"text": "hello"}\n')
    assert not looks_like_chat([tmp_path / "plain.jsonl"]) and not looks_like_chat([good, tmp_path / "plain.jsonl"])
    cases = [
        ({"messages": [{"role": "robot", "content": "x"}]}, r"bad.jsonl:2: messages\[0\].role must be one of"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, r"bad.jsonl:2: conversations\[0\].from"),
        ({"messages": []}, "bad.jsonl:2: empty conversation"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "bad.jsonl:2: no assistant message"),
        ({"messages": [{"role": "user", "content": 3}]}, r"bad.jsonl:2: messages\[0\].content must be a string"),
        ({"text": "plain"}, "bad.jsonl:2: not a conversation"),
        ("not json", "bad.jsonl:2: not valid JSON"),
    ]
    for record, message in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": MULTI[:3]}) + "\n" + (record if isinstance(record, str)
                                                                      else json.dumps(record)) + "\n")
        with pytest.raises(DataError, match=message):
            list(read_conversations(bad, DataStats()))
    result = CliRunner().invoke(app, ["finetune", str(tmp_path / "bad.jsonl"), "--model", "shakespeare-gpt2",
                                      "--out", str(tmp_path / "out"), "--format", "chat", "--no-progress"])
    assert result.exit_code == 2 and "bad.jsonl:2: not valid JSON" in result.output, result.output
    assert "Traceback" not in result.output


def test_long_conversations_lose_their_oldest_turns(tmp_path):
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    long = [MULTI[0]] + [{"role": r, "content": f"turn {i} " + "word " * 10}
                         for i, r in enumerate(["user", "assistant"] * 6)]
    full = encode_conversation(long, template, TOK.encode)[0]
    for budget in (40, 80, len(full) - 1):
        ids, mask = fit_conversation(long, template, TOK.encode, budget)
        assert len(ids) <= budget < len(full)
        text = TOK.decode(ids)
        assert text.startswith("You answer briefly.\n\nUser: turn")  # system kept, a user turn first
        assert text.endswith("turn 11 " + "word " * 9 + "word\n")  # the last exchange kept
        kept = text.count("\nUser: ") + text.count("\nBot: ")  # turns kept
        # whole turns, tokenized exactly as that shorter conversation renders
        assert (ids, mask) == tuple(encode_conversation([long[0], *long[-kept:]], template, TOK.encode)[:2])
    assert fit_conversation(long, template, TOK.encode, 20) is None
    data = _write_jsonl(tmp_path / "long.jsonl", [{"messages": long}, {"messages": MULTI}])
    prepared = prepare_chat_data([data], tmp_path / "cache", tokenizer=TOK, template=template, max_tokens=60,
                                 val_share=0)
    assert prepared.meta["trimmed"] == 1 and prepared.meta["train_conversations"] == 2
    assert int(prepared.train.lengths.max()) <= 60


def _finetune(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpt2lab", "finetune", str(data), "--out", str(out), "--batch-size", "4",
            "--lr", "2e-3", "--log-every", "1", "--seed", "3", "--threads", "1", "--no-progress", *extra]


def _varied(tmp_path: Path, n: int = 48) -> Path:
    rng = random.Random(5)
    records = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))},
                      {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))}]
        records.append({"messages": turns} if i % 2 else
                       {"conversations": [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]}
                                          for t in turns]})
    return _write_jsonl(tmp_path / "chat.jsonl", records)


@pytest.mark.slow
def test_chat_lora_run_resumes_exactly_after_sigkill(tmp_path, tiny_checkpoint):
    data = _varied(tmp_path)
    args = ("--model", str(tiny_checkpoint), "--lora-rank", "4", "--max-steps", "12", "--save-every", "3",
            "--eval-every", "6")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_finetune(data, ref, *args), check=True, env=_env(), capture_output=True, timeout=600)
    # what the run wrote: the template, the metrics say what the losses cover
    assert load_chat_template(ref) == DEFAULT_CHAT_TEMPLATE
    info = json.loads((ref / "training.json").read_text())
    assert info["format"] == "chat" and info["loss_on"] == "assistant_tokens"
    assert all(r["loss_on"] == "assistant_tokens" for r in _metrics(ref))
    assert (ref / "adapter").is_dir()
    sigkill_after_first_checkpoint(_finetune(data, killed, *args), _env(), killed / "trainer", timeout=300)
    subprocess.run(_finetune(data, killed, *args, "--resume"), check=True, env=_env(), capture_output=True,
                   timeout=600)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r.get("loss")) for r in _metrics(ref)] == [(r["step"], r.get("loss")) for r in _metrics(killed)]


@pytest.mark.slow
def test_chat_torchrun_two_processes_match_one(tmp_path, tiny_checkpoint):
    # conversations of different lengths: the loss is the mean over all assistant tokens of the step, so
    # two processes with half the rows each take the same steps as one
    data = _varied(tmp_path, 32)
    common = ("--model", str(tiny_checkpoint), "--max-steps", "4", "--eval-every", "4", "--grad-accum", "2",
              "--dropout", "0")  # dropout would draw different masks in each process
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run(_finetune(data, single, *common), check=True, env=_env(), capture_output=True, timeout=600)
    cmd = _finetune(data, ddp, *common)
    cmd[cmd.index("--batch-size") + 1] = "2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run([*torchrun, *cmd[1:]], env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one = [r["loss"] for r in _metrics(single) if "loss" in r]
    two = [r["loss"] for r in _metrics(ddp) if "loss" in r]
    assert len(one) == 4 and np.allclose(one, two, rtol=1e-4, atol=1e-4), (one, two)
    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# -- the synthetic task ---------------------------------------------------------------------------------
def synthetic_conversations(n: int, seed: int) -> list[dict]:
    """User: three distinct random words; assistant: the same words in reverse order. No persona."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        out.append({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": " ".join(words)},
                                 {"role": "assistant", "content": " ".join(reversed(words))}]})
    return out


def rule_accuracy(model: Path, prompts: list[list[str]]) -> tuple[float, list[str]]:
    """Share of ``gpt2lab chat --message`` replies (greedy) that are the user's words reversed."""
    runner, replies = CliRunner(), []
    for words in prompts:
        result = runner.invoke(app, ["chat", "--model", str(model), "--persona", "", "--message", " ".join(words),
                                     "--temperature", "0", "--max-new-tokens", "8"])
        assert result.exit_code == 0, result.output
        replies.append(result.stdout.strip())
    hits = sum(reply == " ".join(reversed(words)) for reply, words in zip(replies, prompts))
    return hits / len(prompts), replies


def run_synthetic(tmp_path: Path, steps: int) -> dict:
    train = synthetic_conversations(2000, seed=0)
    seen = {tuple(r["messages"][1]["content"].split()) for r in train}
    val = _write_jsonl(tmp_path / "val.jsonl", synthetic_conversations(40, seed=1))
    data = _write_jsonl(tmp_path / "train.jsonl", train)
    rng, unseen = random.Random(2), []
    while len(unseen) < 20:
        words = rng.sample(WORDS, 3)
        if tuple(words) not in seen:
            unseen.append(words)
    result: dict = {}
    for mode in ("--assistant-only-loss", "--all-tokens-loss"):
        out = tmp_path / mode.strip("-")
        subprocess.run([sys.executable, "-m", "gpt2lab", "finetune", str(data), "--val", str(val), "--model",
                        "shakespeare-gpt2", "--out", str(out), "--max-steps", str(steps), "--batch-size", "8",
                        "--lr", "1e-3", "--eval-every", str(steps), "--threads", "2", "--no-progress", mode],
                       check=True, env=dict(_env(), OMP_NUM_THREADS="2"), capture_output=True, timeout=1800)
        val_loss = [r["val_loss"] for r in _metrics(out) if "val_loss" in r]
        result[mode] = {"val_loss": val_loss[-1], "start": val_loss[0], "out": out}
    result["accuracy"], result["replies"] = rule_accuracy(tmp_path / "assistant-only-loss", unseen)
    return result


@pytest.mark.slow
def test_synthetic_rule_is_learned_and_masking_helps(tmp_path):
    steps = int(os.environ.get("GPT2LAB_CHAT_TASK_STEPS", "150"))
    result = run_synthetic(tmp_path, steps)
    masked, unmasked = result["--assistant-only-loss"], result["--all-tokens-loss"]
    print(f"{steps} steps: val loss on assistant tokens {masked['val_loss']:.4f} masked vs "
          f"{unmasked['val_loss']:.4f} unmasked (from {masked['start']:.4f}); rule accuracy "
          f"{result['accuracy']:.0%}; replies {result['replies'][:5]}")
    assert result["accuracy"] >= 0.8
    assert masked["val_loss"] < 0.8 * unmasked["val_loss"]
    # the chat model carries its template: transformers lays the conversation out the same way
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(masked["out"])
    messages = synthetic_conversations(1, seed=9)[0]["messages"][:2]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        gpt2lab.generation.chat_format.style_for_model(None, masked["out"]).chat_template.render(
            messages, add_generation_prompt=True)
