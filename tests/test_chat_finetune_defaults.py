"""A fine-tuned chat model works with the defaults: the run's learning rate fits the model's size, and the
system message of the data becomes the model's default, so ``gpt2lab chat``, ``gpt2lab serve`` and
``gpt2lab review make`` talk to it as it was trained (they used a preamble it never saw: 11 of 20
right, 20 of 20 with ``--persona`` repeating the training message; at 1e-4 it learned the reply's form
and not the rule)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpt2lab.cli.main import app
from gpt2lab.generation.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, load_chat_template
from gpt2lab.model import GPT2Config
from gpt2lab.training.chat_data import default_system_message, with_default_system_message
from gpt2lab.training.config import default_learning_rate

SYSTEM = "You repeat the first word."
# first words the model is trained on, and others it never saw first in a user's turn
TRAIN_WORDS = ["Apple", "River", "Stone", "Cloud", "Forest", "Music", "Window", "Horse", "Bread", "Silver", "Paper",
               "Green", "House", "Water", "Fire", "King", "Bird", "Tree", "Night", "Light", "Road", "Ship", "Gold",
               "Door", "Hand", "Book", "Star", "Moon", "Rain", "Wind", "Sword", "Rose", "Wolf", "Bell", "Garden"]
UNSEEN = ["Castle", "Dragon", "Pencil", "Harbor", "Lantern", "Marble", "Feather", "Island", "Valley", "Shadow"]
ENDINGS = ["is the best thing I have seen today.", "was found near the old house.", "makes me think of home.",
           "can be very loud at night.", "looks nice in the morning light.", "belongs to the king."]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")


def _conversations(n: int, seed: int, system: str | None = SYSTEM) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(TRAIN_WORDS)
        head = [] if system is None else [{"role": "system", "content": system}]
        out.append({"messages": [*head, {"role": "user", "content": f"{word} {rng.choice(ENDINGS)}"},
                                 {"role": "assistant", "content": f"You said {word}."}]})
    return out


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- the pieces ------------------------------------------------------------------------------------------
def test_the_data_system_message_is_found(tmp_path):
    same = _write(tmp_path / "same.jsonl", _conversations(6, 0))
    assert default_system_message([same]) == (SYSTEM, f"every conversation has the system message {SYSTEM!r}")
    mixed = _write(tmp_path / "mixed.jsonl", _conversations(5, 0) + _conversations(2, 1, "Be kind.")
                   + _conversations(1, 2, None))
    message, note = default_system_message([mixed])
    assert message == SYSTEM and "5 of 8 conversations" in note and "2 other variants" in note
    none = _write(tmp_path / "none.jsonl", _conversations(3, 0, None) + _conversations(1, 0))
    assert default_system_message([none]) == (None, "3 of 4 conversations have no system message")


@pytest.mark.parametrize("message", [SYSTEM, "", "It's \"odd\" \\ é 😀\nline two {{ x }} {% raw %}"])
def test_the_default_system_message_is_written_into_the_template(message):
    base = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    template = with_default_system_message(base, message)
    user = [{"role": "user", "content": "Hi"}]
    assert template.render(user, add_generation_prompt=True) == \
        base.render([{"role": "system", "content": message}, *user], add_generation_prompt=True)
    given = [{"role": "system", "content": "Other."}, *user]  # a system message given replaces the default
    assert template.render(given, add_generation_prompt=True) == base.render(given, add_generation_prompt=True)
    again = with_default_system_message(template, "New.")  # a fine-tune of a fine-tune: replaced, not stacked
    assert again.source.count("gpt2lab: the system message") == 1
    assert again.render(user) == base.render([{"role": "system", "content": "New."}, *user])


def test_default_learning_rates_follow_the_size():
    def lr(fine_tune: bool, **shape) -> float:
        return default_learning_rate(GPT2Config(**shape), fine_tune=fine_tune, lora=False)[0]

    gpt2 = dict(n_layer=12, n_embd=768, n_head=12)
    bundled = dict(n_layer=6, n_embd=192, n_head=6)
    assert lr(True, **gpt2) == 1e-4  # GPT-2 124M keeps its fine-tuning rate
    assert lr(True, **bundled) == 8e-4 and lr(True, n_layer=48, n_embd=1600, n_head=25) == 1.2e-5
    assert lr(True, n_layer=2, n_embd=64, n_head=2) == 1e-3  # clipped
    assert lr(False, **gpt2) == 6.9e-4 and lr(False, **bundled) == 1.2e-3  # Kaplan et al.'s fit
    assert default_learning_rate(GPT2Config(**gpt2), fine_tune=True, lora=True)[0] == 1e-3


# -- the user's scenario, smaller ------------------------------------------------------------------------
def _chat(out: Path, message: str, *extra: str) -> str:
    result = CliRunner().invoke(app, ["chat", "--model", str(out), "--message", message, "--temperature", "0",
                                      "--max-new-tokens", "8", *extra])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a 40-step fine-tune: about a minute idle, several on 2 busy cores
def test_a_chat_fine_tune_is_asked_as_it_was_trained(tmp_path):
    """``gpt2lab finetune chats.jsonl --model shakespeare-gpt2`` with no --lr and no --persona anywhere after:
    the run says which learning rate and system message it chose, and chat, review make, the server and
    transformers all put the training system message in front of a conversation that has none (greedy
    replies equal to ``--persona`` with the training message; the server's logprobs equal those of the
    training system message given explicitly, and differ from another system message's).

    Whether such a short run also learns the "repeat the first word" rule is not asserted: on the bundled
    model it takes far more steps and distinct words than a test's budget (see docs/training.md)."""
    data = _write(tmp_path / "chats.jsonl", _conversations(240, 0))
    out = tmp_path / "cm"
    run = subprocess.run([sys.executable, "-m", "gpt2lab", "finetune", str(data), "--model", "shakespeare-gpt2",
                          "--out", str(out), "--max-steps", "40", "--threads", "2", "--no-progress"],
                         capture_output=True, text=True, env=_env(), timeout=1100)
    assert run.returncode == 0, run.stderr
    head = run.stderr.splitlines()[:8]
    assert any(line.startswith("gpt2lab: learning rate 0.0008 (fine-tuning 6 layers of width 192") for line in head), \
        run.stderr
    assert any(line.startswith("gpt2lab: default system message: every conversation has the system message "
                               f"{SYSTEM!r}") for line in head), run.stderr
    assert json.loads((out / "training.json").read_text())["lr"] == 8e-4
    messages = [f"{word} {ENDINGS[i % len(ENDINGS)]}" for i, word in enumerate(UNSEEN)]

    replies = [_chat(out, m) for m in messages]  # gpt2lab chat --message, no --persona
    assert replies == [_chat(out, m, "--persona", SYSTEM) for m in messages[:4]] + replies[4:]
    assert all(r.startswith("You said") for r in replies), replies  # the trained form, under its own preamble
    expected = replies

    # gpt2lab review make: the prompts go to the chat model as user messages
    review = tmp_path / "review.jsonl"
    result = CliRunner().invoke(app, ["review", "make", *messages[:4], "--model", str(out),
                                      "--setting", "temperature=0", "--setting", "temperature=0,max_new_tokens=8",
                                      "--mode", "ratings", "-o", str(review), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    texts = [json.loads(line)["candidates"][0]["text"] for line in review.read_text().splitlines()[1:]]
    assert texts and all(t in expected[:4] for t in texts), (texts, expected[:4])

    # the server: a request without a system message
    openai = pytest.importorskip("openai")
    from .server_helpers import get, launch_in_thread

    launch_in_thread("chat-finetune", out, tmp_path)
    client = openai.OpenAI(base_url=f"{get('chat-finetune').url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    served = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": m}],
                                             temperature=0, max_tokens=8).choices[0].message.content
              for m in messages]
    assert served == replies

    def logprobs(system: str | None) -> list[float]:
        head = [] if system is None else [{"role": "system", "content": system}]
        reply = client.chat.completions.create(model=model, messages=[*head, {"role": "user", "content": messages[0]}],
                                               temperature=0, max_tokens=4, logprobs=True)
        return [t.logprob for t in reply.choices[0].logprobs.content]

    assert logprobs(None) == logprobs(SYSTEM)  # the default is the training message, exactly
    assert logprobs(None) != logprobs("Speak only of the weather.")  # and the preamble reaches the model

    # transformers lays the conversation out the same way, the default system message included
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    user = [{"role": "user", "content": messages[0]}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True).startswith(SYSTEM + "\n\n")
    assert load_chat_template(out).count(SYSTEM) == 1
