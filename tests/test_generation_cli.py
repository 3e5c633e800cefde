"""``gpt2lab generate`` as a real subprocess: streaming text, --json, prompts from stdin/--file, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpt2lab.sampling.pipeline import NAN_SCORES_ERROR

pytestmark = pytest.mark.slow


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "gpt2lab", "generate", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_streams_text_with_seed_defaults(tiny_checkpoint, gen):
    r = _run("Hello 🎉", "--model", str(tiny_checkpoint), "--max-new-tokens", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    # CLI defaults: temperature 0.8, top_k 50
    expected = gen.generate("Hello 🎉", max_new_tokens=12, seed=3, temperature=0.8, top_k=50)[0].text
    assert r.stdout == "Hello 🎉" + expected + "\n"


def test_json_from_stdin_jsonl(tiny_checkpoint, gen):
    stdin = json.dumps({"prompt": "Once upon a time"}) + "\n\n" + json.dumps({"prompt": "日本語"}) + "\n"
    r = _run("--model", str(tiny_checkpoint), "--json", "--n", "2", "--seed", "7", "--max-length", "12",
             "--temperature", "1.0", "--top-p", "0.9", "--logprobs", "2", stdin=stdin)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    from gpt2lab.generation.engine import row_seed

    # prompt k of a command is seeded with row_seed(seed, k) (prompt 0: the seed itself)
    api = [c for k, prompt in enumerate(["Once upon a time", "日本語"])
           for c in gen.generate(prompt, n=2, seed=row_seed(7, k), max_length=12, temperature=1.0, top_k=50,
                                 top_p=0.9, logprobs=2)]
    assert records[2]["token_ids"] != gen.generate("日本語", n=2, seed=7, max_length=12, temperature=1.0,
                                                   top_k=50, top_p=0.9)[0].token_ids  # not the run's seed
    assert [(x["prompt"], x["index"], x["text"], x["token_ids"], x["finish_reason"]) for x in records] == \
        [(c.prompt, c.index, c.text, c.token_ids, c.finish_reason) for c in api]
    assert all(x["model"] == str(tiny_checkpoint) for x in records)
    assert all(len(x["logprobs"]) == len(x["token_ids"]) and len(x["logprobs"][0]["top"]) == 2 for x in records)


def test_file_plain_lines_with_beams_and_stop(tiny_checkpoint, gen, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\nThe weather today\n", encoding="utf-8")
    r = _run("--model", str(tiny_checkpoint), "-f", str(prompts), "--json", "--num-beams", "3",
             "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    api = gen.generate(["Hello world", "The weather today"], num_beams=3, max_new_tokens=6)
    assert [x["token_ids"] for x in records] == [c.token_ids for c in api]


def test_out_writes_the_json_records_to_a_file(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\nThe weather today\nA\n", encoding="utf-8")
    args = ["--model", str(tiny_checkpoint), "-f", str(prompts), "--seed", "4", "--max-new-tokens", "5", "--n", "2"]
    printed = _run(*args, "--json")
    written = _run(*args, "--out", str(tmp_path / "out.jsonl"))
    assert printed.returncode == 0 and written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == printed.stdout
    assert len(printed.stdout.splitlines()) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.txt"]  # no temporary file left


def test_ray_needs_out(tiny_checkpoint):
    r = _run("Hello", "--model", str(tiny_checkpoint), "--ray")
    assert r.returncode == 2 and r.stderr.strip() == "gpt2lab: error: --ray writes its rows to a file: give --out FILE"


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature must be in [0, 100]"),
    (["--n", "0"], "n must be an integer in [1, 128]"),
    (["--max-new-tokens", "500"], "n_positions=128"),
    (["--max-length", "20", "--max-new-tokens", "5"], "give --max-length or --max-new-tokens, not both"),
])
def test_bad_values_exit_2(tiny_checkpoint, args, message):
    r = _run("Hello", "--model", str(tiny_checkpoint), *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("gpt2lab: error: ") and message in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose final LayerNorm weight is NaN: every step's scores are NaN."""
    from safetensors.torch import load_file, save_file

    from .conftest import SHAPES, make_hf_checkpoint

    folder = make_hf_checkpoint(tmp_path_factory.mktemp("nan"), seed=3, **SHAPES["tiny"])
    state = load_file(folder / "model.safetensors")
    state["transformer.ln_f.weight"][:] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("mode", [[], ["--json"], ["--n", "2", "--temperature", "0"]])
def test_a_request_the_engine_ends_with_an_error_fails_in_one_line(nan_checkpoint, mode):
    """The streaming path printed the prompt and exited 0 (the error output was dropped, as if the completion
    were empty); --json ended in a RuntimeError traceback."""
    r = _run("Hello", "--model", str(nan_checkpoint), "--max-new-tokens", "4", "--seed", "1", *mode)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == ("gpt2lab: error: generation failed" + (" for prompt 0" if mode ==
                                                 ["--json"] else "") + ": ValueError: " + NAN_SCORES_ERROR)
    assert "Traceback" not in r.stderr
