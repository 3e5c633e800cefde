"""What a new user following docs/huggingface.md and the README hit, each fixed: a peft adapter folder
given to a generating command, the command a "model not found" message tells you to run, and
``min_tokens`` holding back stop strings as vLLM does."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

import gpt2lab
from gpt2lab.checkpoints import ModelNotFoundError, resolve_model
from gpt2lab.model import optimize_for_inference

from . import server_helpers as sh
from .conftest import SHAPES, make_hf_checkpoint

IDS = [464, 2068, 7586, 21831, 18045, 625, 262]


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """(base folder, adapter folder made by peft, peft's logits on IDS)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = make_hf_checkpoint(tmp_path_factory.mktemp("qa-base"), seed=5, **SHAPES["tiny"])
    torch.manual_seed(0)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)).eval()
    adapter = tmp_path_factory.mktemp("qa-adapter")
    model.save_pretrained(adapter)
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0]
    return base, adapter, logits


def test_adapter_folder_runs_in_the_fast_inference_path(peft_adapter):
    # gpt2lab.load(adapter) used to keep LoRA modules, which optimize_for_inference (run by generate,
    # serve, eval) could not take: AttributeError 'LoRALinear' object has no attribute 'weight'
    _, adapter, theirs = peft_adapter
    gen = gpt2lab.load(adapter, device="cpu")
    optimize_for_inference(gen.model)
    assert (gen.logits(IDS) - theirs).abs().max() < 1e-4


@pytest.mark.slow
def test_generate_cli_on_a_peft_adapter_folder(peft_adapter):
    _, adapter, _ = peft_adapter
    proc = subprocess.run([sys.executable, "-m", "gpt2lab", "generate", "--json", "-m", str(adapter),
                           "--temperature", "0", "--max-new-tokens", "4", "Hello"],
                          capture_output=True, text=True, timeout=300, env=sh._env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = gpt2lab.load(adapter, device="cpu").generate("Hello", temperature=0, max_new_tokens=4)[0]
    assert json.loads(proc.stdout.splitlines()[0])["token_ids"] == expected.token_ids


def test_model_not_found_names_a_command_that_exists(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-user/no-such-gpt2")
    assert "`hf download no-such-user/no-such-gpt2`" in str(info.value)
    scripts = {e.name for e in entry_points(group="console_scripts") if e.value.startswith("huggingface_hub")}
    assert "hf" in scripts  # the installed huggingface_hub has the command the message names


def test_min_tokens_holds_back_stop_strings(tiny_checkpoint):
    """vLLM: no EOS, stop token id or stop string ends a completion before ``min_tokens`` new tokens."""
    gen = gpt2lab.load(tiny_checkpoint, device="cpu")
    world = gen.tokenizer.encode(" world")
    forced = {"logit_bias": {world[0]: 100}, "temperature": 0, "max_new_tokens": 10, "stop": ["world"]}
    early = gen.generate("Hello", **forced)[0]
    assert early.token_ids == world and early.finish_reason == "stop" and early.text == " "
    held = gen.generate("Hello", **forced, min_tokens=3)[0]
    assert held.token_ids == world * 3 and held.finish_reason == "stop" and held.text == " world world "
    assert "".join(gen.stream("Hello", **forced, min_tokens=3)) == held.text


def test_bundled_folders_load_in_autotokenizer_with_their_context():
    """The bundled model and GPT-2 tokenizer folders carry tokenizer_config.json like every saved folder:
    without it AutoTokenizer reported model_max_length 1e30 for the model and could not load the tokenizer."""
    from transformers import AutoTokenizer

    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    model_dir = resolve_model("shakespeare-gpt2").path
    assert AutoTokenizer.from_pretrained(model_dir).model_max_length == 256
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    assert tok.model_max_length == 1024 and tok("Hello world").input_ids == [15496, 995]
    assert gpt2lab.load("shakespeare-gpt2", device="cpu").tokenizer.encode("Hello world") == [15496, 995]
