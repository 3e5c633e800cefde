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


def _evil_bin(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, path)


def test_quantized_load_refuses_a_pickle_that_would_run_code(tmp_path):
    """The quantized loader reads through the same tensor reader: the same refusal, not "truncated"."""
    ckpt = make_hf_checkpoint(tmp_path / "evil", safe=False, **SHAPES["tiny"])
    marker = tmp_path / "pwned"
    _evil_bin(ckpt / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt, quantization="int8")
    assert "pytorch_model.bin: refused: loading this pickle would run code" in str(info.value)
    assert "truncated or corrupt" not in str(info.value)
    assert not marker.exists()


def test_lora_adapter_pickle_that_would_run_code_is_refused(tmp_path, ckpt):
    from gpt2lab.checkpoints.adapters import fill_adapter_dir
    from gpt2lab.model.lora import apply_lora

    gen = gpt2lab.load(ckpt)
    apply_lora(gen.model, rank=2, alpha=4, targets="c_attn")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    fill_adapter_dir(gen.model, adapter, str(ckpt), "c_attn")
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _evil_bin(adapter / "adapter_model.bin", marker)
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: refused: loading this pickle would run code"):
        gpt2lab.load(ckpt, adapter=adapter)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("header size", r"model\.safetensors: cannot read weights .*header size"),
    ("offsets past the end", r"model\.safetensors: cannot read weights .*does not match its data range"),
    ("nested header", r"model\.safetensors: cannot read weights .*nested deeper than 128"),
])
def test_safetensors_header_is_checked_before_reading(ckpt, damage, message):
    """The one tensor reader parses the header itself: every entry is checked against the file's size."""
    import struct

    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if damage == "header size":
        path.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    else:
        if damage == "offsets past the end":
            name = next(k for k in header if k != "__metadata__")
            header[name]["data_offsets"] = [0, len(raw) * 2]
        else:
            header = {"deep": json.loads("[" * 200 + "]" * 200), **header}
        body = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


# -- absurdly nested JSON in every kind of file gpt2lab reads: a clear error naming the file -----------------
DEEP = "[" * 100_000 + "]" * 100_000  # past any recursion limit
NOT_SO_DEEP = '{"a": ' * 200 + "1" + "}" * 200  # under the interpreter's limit, over gpt2lab's bound


@pytest.mark.parametrize("text", [DEEP, NOT_SO_DEEP], ids=["100000", "200"])
@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "vocab.json", "tokenizer.json",
                                  "model.safetensors.index.json"])
def test_nested_json_in_a_checkpoint_file_names_it(ckpt, name, text):
    if name == "model.safetensors.index.json":
        (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    (ckpt / name).write_text(text, encoding="utf-8")
    with pytest.raises((CheckpointError, TokenizerError)) as info:
        gpt2lab.load(ckpt)
    assert f"{name}: JSON nested deeper than 128 levels" in str(info.value)


@pytest.mark.parametrize("text", [DEEP, NOT_SO_DEEP], ids=["100000", "200"])
def test_nested_json_in_tokenizer_and_adapter_configs(ckpt, tmp_path, text):
    from gpt2lab.checkpoints.adapters import read_adapter_config
    from gpt2lab.generation.chat_template import load_chat_template
    from gpt2lab.readers import ReadError, read_json

    (ckpt / "tokenizer_config.json").write_text(text, encoding="utf-8")
    with pytest.raises(ReadError, match=r"tokenizer_config\.json: JSON nested deeper than 128 levels"):
        read_json(ckpt / "tokenizer_config.json")
    assert load_chat_template(ckpt) is None  # an unreadable tokenizer_config.json is ignored there, as before
    saved = gpt2lab.load(ckpt).save(tmp_path / "saved")  # and replaced by a good one when saving
    assert json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"adapter_config\.json: JSON nested deeper than 128 levels"):
        read_adapter_config(tmp_path / "adapter")


@pytest.mark.parametrize("text", [DEEP, NOT_SO_DEEP], ids=["100000", "200"])
def test_nested_json_in_data_review_and_log_files_names_file_and_line(tmp_path, text):
    from gpt2lab.apps.augment import read_dataset
    from gpt2lab.review import read_log, read_review_set
    from gpt2lab.review.reviewset import read_explore
    from gpt2lab.training.data import DataError, DataStats, iter_documents

    lines = '{"text": "fine"}\n' + text + "\n"
    (tmp_path / "d.jsonl").write_text(lines, encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: JSON nested deeper than 128 levels"):
        [list(doc) for doc in iter_documents(tmp_path / "d.jsonl", stats=DataStats())]
    with pytest.raises(ValueError, match=r"d\.jsonl:2: JSON nested deeper than 128 levels"):
        read_dataset(tmp_path / "d.jsonl", "text")
    (tmp_path / "arr.json").write_text("[" + text + "]", encoding="utf-8")
    with pytest.raises(DataError, match=r"arr\.json: JSON nested deeper than 128 levels"):
        [list(doc) for doc in iter_documents(tmp_path / "arr.json", stats=DataStats())]
    review = tmp_path / "r.jsonl"
    review.write_text('{"format": "gpt2lab-review", "version": 1, "mode": "ratings"}\n' + text + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:2: JSON nested deeper than 128 levels"):
        read_review_set(review)
    log = tmp_path / "log.jsonl"
    log.write_text(text + "\n" + '{"reviewer": "a"}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:1: not a review log record \(JSON nested deeper"):
        read_log(log)
    (tmp_path / "explore").mkdir()
    (tmp_path / "explore" / "results.json").write_text(text)
    with pytest.raises(ValueError, match=r"results\.json: JSON nested deeper than 128 levels"):
        read_explore(tmp_path / "explore")


def test_nesting_is_counted_outside_strings_only(tmp_path):
    """Brackets inside strings (code in training data) are text: a shallow record full of them parses."""
    from gpt2lab.readers import MAX_JSON_DEPTH, parse_json

    depth = MAX_JSON_DEPTH - 1  # inside the record's object: MAX_JSON_DEPTH in all
    record = {"text": "[[[{{{" * 1000 + '\\" [[[ \\\\"' * 100, "deep": json.loads("[" * depth + "]" * depth)}
    assert parse_json(json.dumps(record), "f.jsonl", line=1) == record
    record["deep"] = [record["deep"]]
    with pytest.raises(ValueError, match="nested deeper"):
        parse_json(json.dumps(record), "f.jsonl", line=1)


# -- LoRA adapters: adapter_config.json is checked against the tensors before anything is allocated ---------
@pytest.fixture()
def adapter(tmp_path, tiny_checkpoint) -> Path:
    """A rank-4 adapter of the tiny model on c_attn, in peft's format."""
    from gpt2lab.training.lora import apply_lora, fill_adapter_dir

    model = load_model(tiny_checkpoint)
    apply_lora(model, rank=4, alpha=8, targets="c_attn")
    out = tmp_path / "adapter"
    out.mkdir()
    fill_adapter_dir(model, out, str(tiny_checkpoint), "c_attn")
    return out


def _set_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    # allow_nan: Infinity and NaN as Python's json writes them (and reads them back)
    path.write_text(json.dumps(config, allow_nan=True))


@pytest.mark.parametrize("changes, message", [
    ({"r": 1e6}, r"adapter_config\.json: r \(the LoRA rank\) must be an integer in \[1, 65536\], got 1000000\.0"),
    ({"r": 1e9}, r"adapter_config\.json: r \(the LoRA rank\) must be an integer .* got 1000000000\.0"),
    ({"r": 10**9}, r"adapter_config\.json: r \(the LoRA rank\) must be an integer .* got 1000000000"),
    ({"r": 2.5}, r"adapter_config\.json: r \(the LoRA rank\) must be an integer .* got 2\.5"),
    ({"r": True}, r"adapter_config\.json: r \(the LoRA rank\) must be an integer .* got True"),
    ({"r": float("inf")}, r"adapter_config\.json: r \(the LoRA rank\) must be an integer .* got inf"),
    ({"r": 0}, r"adapter_config\.json: r \(the LoRA rank\)"),
    ({"lora_alpha": float("inf")}, r"adapter_config\.json: lora_alpha must be a finite number > 0, got inf"),
    ({"lora_alpha": float("nan")}, r"adapter_config\.json: lora_alpha must be a finite number > 0, got nan"),
    ({"lora_alpha": True}, r"adapter_config\.json: lora_alpha must be a finite number"),
    ({"use_rslora": "yes"}, r"adapter_config\.json: use_rslora must be true or false, got 'yes'"),
    ({"lora_dropout": 2}, r"adapter_config\.json: lora_dropout must be a number in \[0, 1\), got 2"),
    # a rank that passes the range check but is not the tensors' rank: named with the tensor and shapes
    ({"r": 64}, r"adapter_model\.safetensors: tensor h\.0\.attn\.c_attn\.lora_A has shape \(4, 64\) but "
                r"adapter_config\.json says r=64 and h\.0\.attn\.c_attn is 64 -> 192: expected \(64, 64\)"),
])
def test_adapter_config_is_checked_before_anything_is_allocated(tiny_checkpoint, adapter, changes, message):
    """r=1e6 allocated 2.4 GB before failing with a traceback, r=1e9 asked for 256 GB, r=2.5, true or
    Infinity gave tracebacks: each is now a ValueError naming the file and the field, raised before any
    adapter matrix exists."""
    from gpt2lab.training.lora import load_adapter, lora_modules

    _set_config(adapter, **changes)
    model = load_model(tiny_checkpoint)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, adapter)
    assert lora_modules(model) == {}  # no layer was wrapped: nothing was allocated from the config
    # and through gpt2lab.load and the CLI: one line naming the file, exit 2
    with pytest.raises(ValueError, match=message):
        gpt2lab.load(tiny_checkpoint, adapter=adapter)


def test_adapter_tensors_must_have_the_config_rank(tiny_checkpoint, adapter):
    """Rank-1 tensors under r=4 were broadcast into the rank-4 matrices without a word."""
    from safetensors.torch import load_file, save_file

    from gpt2lab.training.lora import load_adapter

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: (v[:1] if "lora_A" in k else v[:, :1]).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"lora_A has shape \(1, 64\) but adapter_config\.json says r=4"):
        load_adapter(load_model(tiny_checkpoint), adapter)
    # a missing half of a pair, a tensor for a layer the model lacks, a corrupt file
    save_file({k: v for k, v in load_file(str(weights)).items() if "lora_B" not in k}, str(weights))
    with pytest.raises(ValueError, match=r"lora_A has no lora_B to go with it|has shape"):
        load_adapter(load_model(tiny_checkpoint), adapter)
    name = "base_model.model.transformer.h.9.attn.c_attn.lora_A.weight"
    save_file({name: torch.zeros(4, 64)}, str(weights))
    with pytest.raises(ValueError, match=r"h\.9\.attn\.c_attn.*not a linear layer of the model"):
        load_adapter(load_model(tiny_checkpoint), adapter)
    _truncate(weights)
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: cannot read weights"):
        load_adapter(load_model(tiny_checkpoint), adapter)


def test_bad_adapter_is_one_line_in_the_cli(tiny_checkpoint, adapter):
    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    _set_config(adapter, r=2.5)
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(adapter), "--max-new-tokens", "1"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"gpt2lab: error: {adapter / 'adapter_config.json'}: r (the LoRA rank) must be an integer in [1, 65536], "
        "got 2.5"]
