"""Sliding-window perplexity against the Hugging Face guide's loop run with transformers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab.evaluation import perplexity
from gpt2lab.evaluation.scoring import sliding_windows

from .conftest import SHAPES, make_hf_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory) -> Path:
    # a larger init than GPT-2's 0.02 makes predictions depend strongly on the context, so scoring a
    # token with the wrong context (or scoring the wrong tokens) moves perplexity far beyond 1e-4
    return make_hf_checkpoint(tmp_path_factory.mktemp("sharp"), seed=2, initializer_range=0.3, **SHAPES["tiny"])


@pytest.fixture(scope="module")
def text() -> str:
    # about 450 GPT-2 tokens of varied text (code and prose): the head of a gpt2lab module, kept as a file of
    # its own so that editing the module does not change what this test measures
    return (Path(__file__).parent / "data" / "perplexity_code_and_prose.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sharp(sharp_checkpoint):
    return gpt2lab.load(sharp_checkpoint)


def guide_loop(model, input_ids: torch.Tensor, max_length: int, stride: int):
    """The loop of "Perplexity of fixed-length models" (transformers docs), with transformers' model.

    Returns (guide's perplexity, guide's token count, exact perplexity, tokens the losses averaged
    over). The guide weights each window's mean loss by ``num_valid_tokens - batch_size``; that is
    the number of tokens the loss averaged over for the first window and whenever stride ==
    max_length, but one less for later windows when stride < max_length (their first unmasked label
    is not at position 0, so the label shift drops a masked one). The exact figure weights by the
    real count.
    """
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, exact_sum, exact_n = 0.0, 0, 0.0, 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(window, labels=target_ids).loss.double().item()
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        averaged_over = (target_ids[:, 1:] != -100).sum().item()
        exact_sum += neg_log_likelihood * averaged_over
        exact_n += averaged_over
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens, math.exp(exact_sum / exact_n), exact_n


@pytest.fixture(scope="module")
def hf(sharp_checkpoint, text):
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(sharp_checkpoint).eval()
    ids = GPT2TokenizerFast.from_pretrained(sharp_checkpoint)(text, return_tensors="pt").input_ids
    return model, ids


@pytest.mark.parametrize("block,stride", [(64, 64), (50, 50)])
def test_stride_equal_block_matches_guide(sharp, text, hf, block, stride):
    model, ids = hf
    guide_ppl, guide_tokens, _, _ = guide_loop(model, ids, block, stride)
    ours = perplexity(text, model=sharp, block_size=block, stride=stride)
    assert ours.tokens == guide_tokens  # the first token of every window has no context: unscored
    assert ours.tokens == ids.size(1) - math.ceil(ids.size(1) / block)
    assert abs(ours.perplexity - guide_ppl) / guide_ppl < 1e-4


@pytest.mark.parametrize("block,stride", [(64, 32), (64, 23)])
def test_stride_below_block_matches_guide(sharp, text, hf, block, stride):
    model, ids = hf
    guide_ppl, _, exact_ppl, exact_tokens = guide_loop(model, ids, block, stride)
    ours = perplexity(text, model=sharp, block_size=block, stride=stride, batch_tokens=1000)
    assert ours.tokens == exact_tokens == ids.size(1) - 1  # every token but the first, once
    assert abs(ours.perplexity - exact_ppl) / exact_ppl < 1e-4
    # the guide's own weighting differs only by its one-token-per-window undercount
    assert abs(ours.perplexity - guide_ppl) / guide_ppl < 5e-3
    # more context per token than disjoint windows: a different figure, so context really is used
    disjoint = perplexity(text, model=sharp, block_size=block, stride=block)
    assert abs(disjoint.perplexity - ours.perplexity) / ours.perplexity > 1e-3


def test_sliding_windows_score_every_token_once():
    for n, block, stride in [(1000, 128, 64), (1000, 128, 128), (130, 128, 37), (5, 128, 64), (300, 7, 3)]:
        scored = [t for begin, end, first in sliding_windows(n, block, stride) for t in range(first, end)]
        assert len(scored) == len(set(scored))
        if stride < block:
            assert scored == list(range(1, n))
        for begin, end, first in sliding_windows(n, block, stride):
            assert 0 <= begin < first < end <= begin + block


def test_files_pool_and_batching_does_not_change_results(sharp, text, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[:900], encoding="utf-8")
    b.write_text("Ünïcödé — ✓ " + text[900:1300], encoding="utf-8")
    both = perplexity(files=[a, b], model=sharp, block_size=96, stride=40)
    small_batches = perplexity(files=[a, b], model=sharp, block_size=96, stride=40, batch_tokens=1)
    alone = [perplexity(files=[f], model=sharp, block_size=96, stride=40) for f in (a, b)]
    assert [d.name for d in both.files] == [str(a), str(b)]
    for doc, single, unbatched in zip(both.files, alone, small_batches.files):
        assert doc.tokens == single.tokens == unbatched.tokens
        assert doc.nll == pytest.approx(single.nll, rel=1e-5) == pytest.approx(unbatched.nll, rel=1e-5)
        assert doc.bytes == len(Path(doc.name).read_text(encoding="utf-8").encode("utf-8"))
        assert doc.bits_per_byte == pytest.approx(doc.nll / math.log(2) / doc.bytes)
    assert both.tokens == sum(d.tokens for d in both.files)
    assert both.perplexity == pytest.approx(math.exp(sum(d.nll for d in both.files) / both.tokens))
    assert both.bits_per_byte == pytest.approx(both.nll / math.log(2) / (both.files[0].bytes + both.files[1].bytes))


def test_a_documents_figures_do_not_depend_on_the_documents_scored_with_it(sharp, text):
    # what lets Ray actors score a corpus's documents apart and sum them to the one-process figures exactly
    from gpt2lab.evaluation.perplexity import combine, score_documents

    cuts = [0, 60, 100, len(text) // 2, len(text) // 2 + 150, len(text) - 90, len(text)]
    texts = [text[a:b] for a, b in zip(cuts, cuts[1:])]  # windows of many widths
    names = [f"doc{i}" for i in range(len(texts))]
    together = score_documents(sharp, texts, names, block_size=128, stride=48)
    alone = [score_documents(sharp, [t], [n], block_size=128, stride=48)[0] for t, n in zip(texts, names)]
    assert [(d.nll, d.tokens) for d in together] == [(d.nll, d.tokens) for d in alone]  # bit for bit
    one = perplexity(texts, model=sharp, names=names, block_size=128, stride=48)
    assert combine(alone, model=sharp.name, block_size=128, stride=48).nll == one.nll


def test_bad_arguments_name_the_parameter(sharp, tmp_path):
    gen = sharp
    with pytest.raises(ValueError, match="stride"):
        perplexity("some text here", model=gen, block_size=64, stride=65)
    with pytest.raises(ValueError, match="block_size"):
        perplexity("some text here", model=gen, block_size=129)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity("Hi", model=gen)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        perplexity(files=[tmp_path / "missing.txt"], model=gen)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:1: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        perplexity(files=[bad], model=gen)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_cli_json_and_errors(sharp_checkpoint, sharp, text, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(text[:1000], encoding="utf-8")
    done = _cli("eval", "perplexity", str(f), "--model", str(sharp_checkpoint), "--block-size", "64", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    expected = perplexity(files=[f], model=sharp, block_size=64)
    assert record["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert record["tokens"] == expected.tokens and record["stride"] == 32
    assert record["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert [d["name"] for d in record["files"]] == [str(f)]
    assert record["model"] == str(sharp_checkpoint)

    bad = _cli("eval", "perplexity", str(f), "--model", str(sharp_checkpoint), "--stride", "0")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "gpt2lab: error: stride must be an integer in [1, block_size=128], got 0"
