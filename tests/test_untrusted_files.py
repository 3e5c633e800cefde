"""Untrusted model files fail fast and loudly: broken tokenizer files, config/weights mismatches, pickles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab.checkpoints import CheckpointError, load_model
from gpt2lab.checkpoints.io import check_shapes, expected_shapes
from gpt2lab.errors import TokenizerError
from gpt2lab.model import GPT2Config
from gpt2lab.tokenizer import Tokenizer, gpt2_tokenizer_dir

from .conftest import SHAPES, make_hf_checkpoint


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, message", [
    ("truncated vocab.json", r"vocab\.json: not valid JSON \(truncated\?\)"),
    ("binary merges.txt", r"merges\.txt: looks like a binary file"),
    ("latin-1 merges.txt", r"merges\.txt:2: not valid UTF-8"),
    ("garbled merges.txt", r"merges\.txt:3: not a BPE merge"),
    ("vocab.json not a vocabulary", r"vocab\.json: not a BPE vocabulary"),
    ("merges.txt missing", r"merges\.txt: file not found"),
    ("truncated tokenizer.json", r"tokenizer\.json: not valid JSON \(truncated\?\)"),
])
def test_broken_tokenizer_file_is_an_error_naming_it(ckpt, damage, message, capsys):
    vocab, merges = ckpt / "vocab.json", ckpt / "merges.txt"
    if damage == "truncated vocab.json":
        _truncate(vocab)
    elif damage == "binary merges.txt":
        merges.write_bytes(bytes(range(256)) * 4)
    elif damage == "latin-1 merges.txt":
        merges.write_bytes(b"#version: 0.2\ncaf\xe9 x\n")
    elif damage == "garbled merges.txt":
        merges.write_text("#version: 0.2\na b\nthis line has three spaces\n", encoding="utf-8")
    elif damage == "vocab.json not a vocabulary":
        vocab.write_text('{"a": "b"}', encoding="utf-8")
    elif damage == "merges.txt missing":
        merges.unlink()
    else:
        text = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})
        (ckpt / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(TokenizerError, match=message):
        gpt2lab.load(ckpt)
    assert "using GPT-2's tokenizer" not in capsys.readouterr().err  # never silently replaced


def test_only_a_folder_without_tokenizer_files_falls_back(ckpt, capsys):
    for name in ("vocab.json", "merges.txt"):
        (ckpt / name).unlink()
    gen = gpt2lab.load(ckpt)
    assert "has no tokenizer files; using GPT-2's tokenizer" in capsys.readouterr().err
    assert gen.tokenizer.encode("hello world") == Tokenizer.gpt2().encode("hello world")


def test_broken_tokenizer_is_one_line_in_the_cli(ckpt):
    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    _truncate(ckpt / "vocab.json")
    result = CliRunner().invoke(app, ["generate", "Hi", "--model", str(ckpt), "--max-new-tokens", "2"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: error: ") and "vocab.json" in lines[0]


def test_config_weights_mismatch_fails_before_allocating(ckpt):
    """A config asking for a 100-billion-parameter model next to tiny weights fails at once, naming both."""
    config = json.loads((ckpt / "config.json").read_text())
    config.update(n_embd=16384, n_head=128, n_layer=2, vocab_size=50257 * 8)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor \S+ has shape .* but \S*config\.json "):
        load_model(ckpt)
    config.update(n_layer=100_000, n_embd=64, n_head=2, vocab_size=50257)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: has blocks h\.0-h\.1 but \S*config\.json says "
                                              r"n_layer=100000"):
        load_model(ckpt)


def test_check_shapes_takes_any_name_to_shape_mapping():
    """The check works on a plain {HF name: shape} mapping, e.g. the union of a sharded checkpoint."""
    config = GPT2Config(**SHAPES["tiny"])
    ours = expected_shapes(config)
    hf = {("lm_head.weight" if k == "lm_head.weight" else f"transformer.{k}"):
          (tuple(reversed(v)) if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v)
          for k, v in ours.items()}
    check_shapes(config, hf, "shards", "config.json")  # matches
    hf["transformer.h.1.mlp.c_fc.weight"] = (64, 999)
    with pytest.raises(CheckpointError, match=r"shards: tensor h\.1\.mlp\.c_fc\.weight has shape \(999, 64\)"):
        check_shapes(config, hf, "shards", "config.json")
    del hf["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(e\.g\. h\.1\.mlp\.c_fc\.weight\)"):
        check_shapes(config, hf, "shards", "config.json")


def test_bin_checkpoint_is_checked_too(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "bin", safe=False, **SHAPES["tiny"])
    config = json.loads((ckpt / "config.json").read_text())
    config["n_positions"] = 256
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: tensor wpe\.weight has shape \(128, 64\) but "):
        load_model(ckpt)


def test_refused_pickle_says_it_would_run_code(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "evil", safe=False, **SHAPES["tiny"])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    message = str(info.value)
    assert "pytorch_model.bin: refused: loading this pickle would run code" in message
    assert "truncated or corrupt" not in message
    assert not marker.exists()


def test_gpt2_tokenizer_files_pass_the_checks():
    assert Tokenizer.from_dir(gpt2_tokenizer_dir()).encode("Hello world") == [15496, 995]
