"""Checkpoint resolution, loading errors that name the file and the problem, and saving."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gpt2lab
from gpt2lab.checkpoints import CheckpointError, ModelNotFoundError, load_model, resolve_model, save_model

from .conftest import SHAPES, make_hf_checkpoint


def test_truncated_safetensors_names_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read weights .*truncated or corrupt"):
        load_model(ckpt)


def test_corrupt_bin_names_file(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "bin", safe=False, **SHAPES["tiny"])
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read weights"):
        load_model(ckpt)


def test_missing_weights_and_config(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or pytorch_model\.bin"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_model(ckpt)


def test_shape_mismatch_names_tensor_and_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["n_embd"] = 128
    (ckpt / "config.json").write_text(json.dumps(config))
    pattern = r"model\.safetensors: tensor \S+ has shape \(\d+,.*\) but .*config\.json implies"
    with pytest.raises(CheckpointError, match=pattern):
        load_model(ckpt)


def test_unsupported_config_rejected(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["activation_function"] = "mish"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: activation_function 'mish' is not supported"):
        load_model(ckpt)
    config.update(activation_function="gelu_new", model_type="llama")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type is 'llama'"):
        load_model(ckpt)


def test_missing_tensor_reported(ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(e\.g\. h\.1\.mlp\.c_fc\.weight\)"):
        load_model(ckpt)


def test_resolve_local_and_unknown(tmp_path, ckpt):
    assert resolve_model(str(ckpt)).source == "local"
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        resolve_model("someone/not-cached-model")


def test_offline_hub_error_is_fast_and_clean(tmp_path):
    """The CLI says what is wrong in one line, with no traceback, when a Hub model is unavailable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "gpt2lab", "info", "--model", "distilgpt2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model 'distilgpt2': not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set" in proc.stderr


def test_save_fp16_loads_as_fp32(tmp_path, ckpt):
    model = load_model(ckpt)
    out = save_model(model, tmp_path / "half", tokenizer_dir=ckpt, dtype=torch.float16)
    again = load_model(out)
    assert again.wte.weight.dtype == torch.float32
    assert (again.wte.weight - model.wte.weight).abs().max() < 1e-3
    assert (out / "vocab.json").is_file() and not list(tmp_path.glob(".half.tmp-*"))


def test_untied_head_round_trip(tmp_path):
    from transformers import GPT2LMHeadModel

    ckpt = make_hf_checkpoint(tmp_path / "untied", tie_word_embeddings=False, **SHAPES["tiny"])
    gen = gpt2lab.load(ckpt)
    assert gen.model.lm_head is not None
    ids = [1, 2, 3, 4]
    ref = GPT2LMHeadModel.from_pretrained(gen.save(tmp_path / "out")).eval()
    with torch.no_grad():
        assert (ref(torch.tensor([ids])).logits[0] - gen.logits(ids)).abs().max() < 1e-4


def test_import_is_lightweight():
    code = "import sys, gpt2lab; heavy = [m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules]; " \
           "print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
