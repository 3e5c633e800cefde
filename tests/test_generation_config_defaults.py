"""A checkpoint's ``generation_config.json`` gives the defaults of the CLI and the server, not only the
library: explicit values > the checkpoint > a command's own defaults > SamplingParams' defaults.

The model folder is saved by ``transformers`` with ``do_sample: false, max_new_tokens: 5``; the reference is
``transformers``' own ``generate()`` on the same folder. The CLI runs as real subprocesses and the server
on a real port."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

import gpt2lab

from . import server_helpers as sh
from .conftest import SHAPES, make_hf_checkpoint

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def greedy5(tmp_path_factory):
    """(folder, transformers' 5 new tokens for PROMPT)."""
    from transformers import GenerationConfig, GPT2LMHeadModel

    folder = make_hf_checkpoint(tmp_path_factory.mktemp("greedy5"), seed=4, **SHAPES["tiny"])
    GenerationConfig(do_sample=False, max_new_tokens=5, eos_token_id=50256).save_pretrained(folder)
    ids = gpt2lab.load(folder, device="cpu").tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = GPT2LMHeadModel.from_pretrained(folder).eval().generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    ref = out[0, len(ids):].tolist()
    assert len(ref) == 5
    return folder, ref


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, timeout=300,
                          env=sh._env())
    assert proc.returncode == 0, proc.stderr
    return proc


def _generate_json(folder, *flags: str) -> dict:
    out = _cli("generate", "--json", "-m", str(folder), *flags, PROMPT)
    return json.loads(out.stdout.splitlines()[0])


# -- the one merge ------------------------------------------------------------------------------------
def test_precedence_explicit_checkpoint_command_defaults(greedy5):
    folder, _ = greedy5
    gen = gpt2lab.load(folder, device="cpu")
    command = {"max_length": 100, "temperature": 0.8, "top_k": 50}
    p = gen.resolve_sampling({}, command)
    # the checkpoint's do_sample false and max_new_tokens beat the command's temperature and max_length
    assert p.temperature == 0 and p.max_new_tokens == 5 and p.max_length is None and p.top_k == 50
    # explicit values beat the checkpoint (either length replaces its max_new_tokens)
    p = gen.resolve_sampling({"temperature": 0.7, "max_length": 9}, command)
    assert p.temperature == 0.7 and p.max_length == 9 and p.max_new_tokens is None
    assert gen.resolve_sampling({"do_sample": True}, command).temperature == 0.8  # the command's temperature
    # a command whose defaults are its purpose (varied drafts) keeps them over the checkpoint's
    p = gen.resolve_sampling({}, {"temperature": 0.9}, defaults_win=True)
    assert p.temperature == 0.9 and p.max_new_tokens == 5
    # what the command cannot use, the checkpoint cannot set either
    assert gen.resolve_sampling({}, {}, skip={"max_new_tokens", "max_length"}).max_new_tokens is None
    # no generation_config.json: the command's defaults
    gen.generation_config = {}
    assert gen.resolve_sampling({}, command).max_length == 100


# -- the CLI --------------------------------------------------------------------------------------------
def test_generate_cli_follows_the_checkpoint_and_flags_win(greedy5):
    folder, ref = greedy5
    record = _generate_json(folder, "--seed", "3")
    assert record["token_ids"] == ref  # greedy, exactly 5 tokens, as transformers
    record = _generate_json(folder, "--max-new-tokens", "3", "--seed", "3")
    assert record["token_ids"] == ref[:3]  # the flag's length, the checkpoint's greedy decoding
    sampled = [_generate_json(folder, "--temperature", "1.5", "--top-k", "0", "--seed", str(s))["token_ids"]
               for s in (1, 2)]
    assert all(len(t) == 5 for t in sampled) and sampled[0] != sampled[1]  # sampling: seeds differ


def test_chat_cli_follows_the_checkpoint(greedy5):
    from gpt2lab.apps.chat import ChatSession

    folder, _ = greedy5
    gen = gpt2lab.load(folder, device="cpu")
    greedy = ChatSession(gen, params=gen.sampling_params(max_new_tokens=5, temperature=0,
                                                         repetition_penalty=1.1, top_k=50)).reply("Hello there")
    out = _cli("chat", "-m", str(folder), "--message", "Hello there", "--seed", "7")
    assert out.stdout.rstrip("\n") == greedy


# -- the server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(greedy5, tmp_path_factory):
    folder, _ = greedy5
    sh.launch("greedy5", folder, tmp_path_factory.mktemp("greedy5-logs"))
    return sh.get("greedy5")


def test_server_request_fields_not_sent_take_the_checkpoints(server, greedy5):
    _, ref = greedy5
    tok = gpt2lab.load(greedy5[0], device="cpu").tokenizer
    ids = tok.encode(PROMPT)
    body = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "seed": 5}, timeout=60).json()
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] == 5 and choice["finish_reason"] == "length"
    assert choice["text"] == tok.decode(ref)  # greedy, as transformers
    again = httpx.post(f"{server.url}/v1/completions", json={"prompt": ids, "seed": 6}, timeout=60).json()
    assert again["choices"][0]["text"] == choice["text"]  # greedy: the seed changes nothing
    # the client's fields win
    body = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60).json()
    assert body["usage"]["completion_tokens"] == 2
    texts = {httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "temperature": 1.5, "seed": s},
                        timeout=60).json()["choices"][0]["text"] for s in (1, 2, 3)}
    assert len(texts) > 1
    chat = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "Hello"}]}, timeout=60).json()
    assert chat["usage"]["completion_tokens"] <= 5
    card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    assert card["generation_config"]["max_new_tokens"] == 5
