"""The sampling explorer: batched grid generation, scores, and its four output files."""

from __future__ import annotations

import csv
import html
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2lab
from gpt2lab.checkpoints import bundled_model_dir
from gpt2lab.evaluation import explore, grid

SRC = Path(__file__).resolve().parents[1] / "src"
PROMPTS = ["Once upon a time", 'Tags like <b>bold</b> & "quotes"']


@pytest.fixture(scope="module")
def run(gen, tmp_path_factory):
    out = tmp_path_factory.mktemp("explore") / "out"
    result = explore(PROMPTS, gen, temperatures=[0.5, 1.5], top_ks=[0, 20], top_ps=[0.9], max_length=14, samples=3,
                     seed=7, out=out)
    return result, out


def test_every_setting_is_scored_with_its_samples(run):
    result, _ = run
    labels = [r.setting.label for r in result.settings]
    assert labels == ["T=0.5 k=0 p=0.9", "T=0.5 k=20 p=0.9", "T=1.5 k=0 p=0.9", "T=1.5 k=20 p=0.9"]
    for r in result.settings:
        assert len(r.samples) == len(PROMPTS) * 3
        assert [s.prompt for s in r.samples] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
        assert r.perplexity > 1 and 0 < r.distinct_2 <= 1 and r.self_bleu is not None
        assert r.mean_tokens == pytest.approx(sum(s.tokens for s in r.samples) / len(r.samples))


def test_batched_grid_equals_generating_each_setting_alone(gen, run):
    result, _ = run
    for r in result.settings[::3]:
        s = r.setting
        alone = gen.generate(PROMPTS, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_length=14, n=3,
                             seed=7)
        assert [c.text for c in alone] == [x.text for x in r.samples]
        # each sample's perplexity is its completion's, given the prompt, under the model
        c, x = alone[0], r.samples[0]
        prompt_ids = gen.encode_prompt(c.prompt)
        logprobs = [t.logprob for t in gen.score(prompt_ids + c.token_ids)][len(prompt_ids) - 1:]
        assert x.tokens == len(c.token_ids) == len(logprobs)
        assert x.perplexity == pytest.approx(math.exp(-sum(logprobs) / len(logprobs)), rel=1e-4)


def test_writes_csv_json_png_html(run):
    result, out = run
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "report.html", "results.csv", "results.json"]
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert [r["label"] for r in rows] == [r.setting.label for r in result.settings]
    assert float(rows[0]["distinct_2"]) == pytest.approx(result.settings[0].distinct_2)
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["prompts"] == PROMPTS and data["seed"] == 7 and len(data["settings"]) == 4
    assert data["settings"][1]["samples"][0]["text"] == result.settings[1].samples[0].text

    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    image = imread(out / "plot.png")
    assert image.ndim == 3 and 400 <= image.shape[0] <= 2000 and 600 <= image.shape[1] <= 3000
    assert image[..., :3].std() > 0.05  # not a blank canvas

    page = (out / "report.html").read_text(encoding="utf-8")
    for r in result.settings:
        assert html.escape(r.setting.label) in page
        for s in r.samples:
            assert html.escape(s.text) in page
    assert html.escape(PROMPTS[1]) in page and PROMPTS[1] not in page  # escaped, never raw
    assert "data:image/png;base64," in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained


def test_separate_scoring_model_scores_the_text(gen, tiny_checkpoint):
    scorer = gpt2lab.load(tiny_checkpoint)
    scorer.name = "scorer"
    result = explore("Hello", gen, temperatures=[1.0], top_ks=[0], top_ps=[1.0], max_length=8, samples=2, seed=1,
                     scoring_model=scorer)
    (r,) = result.settings
    assert result.scoring_model == "scorer" and result.model != "scorer"
    # another Generator: the samples are re-encoded with its tokenizer and scored given the prompt
    assert r.perplexity > 1 and all(s.tokens > 0 for s in r.samples)


def test_a_failed_generation_raises_instead_of_being_scored_as_empty(tiny_checkpoint):
    """A sample the engine ended with an error (NaN scores here) was scored as an empty continuation."""
    import torch

    from gpt2lab.errors import GenerationFailed

    broken = gpt2lab.load(tiny_checkpoint)
    with torch.no_grad():
        broken.model.ln_f.weight[:] = float("nan")
    with pytest.raises(GenerationFailed, match="scores are NaN"):
        explore("Hello", broken, temperatures=[1.0], top_ks=[0], top_ps=[1.0], max_length=8, samples=2, seed=1)


def test_grid_validation_names_the_parameter():
    assert len(grid([0.7, 0.7, 1.0], [0], [1.0])) == 2
    with pytest.raises(ValueError, match="top_p must be in"):
        grid([1.0], [0], [1.5])
    with pytest.raises(ValueError, match="temperature must be in"):
        grid([-1.0], [0], [1.0])
    with pytest.raises(ValueError, match="top_k: give at least one value"):
        grid([1.0], [], [1.0])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_cli(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nThe sea\n", encoding="utf-8")
    out = tmp_path / "out"
    done = _cli("explore", "--prompts", str(prompts), "--model", str(tiny_checkpoint), "-t", "0.7,1.2", "-k", "0",
                "-p", "1.0", "--samples", "2", "--max-length", "10", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["prompts"] == ["Hello there", "The sea"]
    assert [s["label"] for s in data["settings"]] == ["T=0.7 k=0 p=1", "T=1.2 k=0 p=1"]
    assert (out / "report.html").is_file() and (out / "plot.png").is_file()
    bad = _cli("explore", "hi", "--model", str(tiny_checkpoint), "-t", "0.3,warm", "--out", str(out))
    assert bad.returncode == 2
    assert bad.stderr.strip() == "gpt2lab: error: --temperature: '0.3,warm' is not a comma-separated list of numbers"
    bad = _cli("explore", "hi", "--model", str(tiny_checkpoint), "-p", "1.5", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip() == "gpt2lab: error: top_p must be in (0, 1], got 1.5"


@pytest.mark.slow
@pytest.mark.skipif(bundled_model_dir("shakespeare-gpt2") is None,
                    reason="the bundled model shakespeare-gpt2 is not installed yet: the direction check needs a "
                           "trained model (a random one has no coherent text to lose)")
def test_higher_temperature_is_more_diverse_and_less_coherent(tmp_path):
    result = explore(["ROMEO:", "JULIET:\nO", "First Citizen:\n"], "shakespeare-gpt2", temperatures=[0.5, 1.3],
                     top_ks=[0], top_ps=[1.0], max_length=48, samples=8, seed=0)
    cold, hot = result.settings
    assert hot.distinct_2 > cold.distinct_2
    assert hot.perplexity > cold.perplexity
