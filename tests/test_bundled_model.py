"""The bundled Shakespeare model: shape and size limits, its recorded held-out perplexity, and the
offline fallback that makes a fresh install generate text with no network."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2lab
from gpt2lab.checkpoints import bundled_model_dir

BUNDLED = bundled_model_dir("shakespeare-gpt2")
SLICE = Path(__file__).parent / "data" / "hamlet_heldout_slice.txt"  # held out from training
# every word of the training text (written by recipes/shakespeare/model_card.py, same WORD pattern)
TRAIN_WORDS = Path(__file__).parent / "data" / "shakespeare_train_words.txt.gz"
WORD = re.compile(r"[A-Za-z']+")
pytestmark = pytest.mark.skipif(BUNDLED is None, reason="the bundled model is not installed")


def test_shape_and_size_limits():
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["n_positions"] >= 256
    assert (BUNDLED / "model.safetensors").stat().st_size <= 30 * 2**20
    gen = gpt2lab.load("shakespeare-gpt2")
    assert gen.model.wte.weight.dtype.is_floating_point and gen.model.wte.weight.element_size() == 4  # fp32
    assert gen.tokenizer.encode("Hello world") == [15496, 995]


def test_heldout_perplexity_is_the_recorded_one():
    """The model card's figure on the held-out slice, re-measured here."""
    recorded = json.loads((BUNDLED / "eval.json").read_text())
    result = gpt2lab.evaluate.perplexity(files=[SLICE], model="shakespeare-gpt2", block_size=256, stride=128)
    assert result.perplexity == pytest.approx(recorded["heldout_slice_perplexity"], rel=1e-3)
    assert result.perplexity < recorded["heldout_slice_unigram_perplexity"]


def test_heldout_perplexity_is_under_a_third_of_unigram():
    """The issue's quality bar, on the whole held-out plays as recorded by the model card."""
    recorded = json.loads((BUNDLED / "eval.json").read_text())
    assert recorded["heldout_perplexity"] <= recorded["heldout_unigram_perplexity"] / 3


def test_samples_are_mostly_real_words():
    """At temperature 0.8, at least 90% of generated words occur in the training text."""
    vocabulary = set(gzip.decompress(TRAIN_WORDS.read_bytes()).decode().split())
    assert {"king", "thou", "love"} <= vocabulary and len(vocabulary) > 20_000
    gen = gpt2lab.load("shakespeare-gpt2")
    prompts = ["ROMEO:\n", "Enter KING LEAR", "JULIET.\nO Romeo", "First Citizen:\n"]
    words = [w.lower() for c in gen.generate(prompts, max_new_tokens=100, temperature=0.8, n=3, seed=7)
             for w in WORD.findall(c.text)]
    assert len(words) > 400
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.90, f"only {known:.1%} of {len(words)} generated words occur in the training text"


@pytest.mark.slow
def test_offline_default_uses_bundled_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "gpt2lab", "generate", "ROMEO:", "--max-new-tokens", "12",
                           "--seed", "1", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.splitlines()[0])
    assert record["model"] == "shakespeare-gpt2" and record["token_ids"]
    notice = [line for line in proc.stderr.splitlines() if "bundled model" in line]
    assert len(notice) == 1 and "'shakespeare-gpt2'" in notice[0] and "--model" in notice[0]
