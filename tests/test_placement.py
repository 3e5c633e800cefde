"""gpt2lab.placement: one vocabulary of device, dtype and quantization names, read the same way by every
front end (gpt2lab.load, checkpoints.load_model, Generator.save, the CLI, the server, training), with errors
that name the parameter and its allowed values."""

from __future__ import annotations

import json

import pytest
import torch

import gpt2lab
from gpt2lab import placement
from gpt2lab.checkpoints import load_model
from gpt2lab.cli.options import build_runtime
from gpt2lab.placement import (
    QUANTIZATIONS,
    check_quantization,
    dtype_name,
    parse_dtype,
    resolve_device,
    resolve_dtype,
    storage_dtype,
)
from gpt2lab.server.state import ServerState
from gpt2lab.training.config import TrainConfig

CPU = torch.device("cpu")
SPELLINGS = {"float32": torch.float32, "fp32": torch.float32, "FLOAT32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, " BF16 ": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@pytest.mark.parametrize("spelled, expected", SPELLINGS.items())
def test_every_spelling_of_a_dtype_means_one_torch_dtype(spelled, expected):
    assert parse_dtype(spelled) == expected
    assert parse_dtype(expected) == expected
    assert resolve_dtype(spelled, CPU) == expected
    assert storage_dtype(spelled, lambda: pytest.fail("the stored dtype is read only for auto")) == expected
    # the CLI and training accept the same spellings, and training stores the canonical name
    assert build_runtime("cpu", spelled, None, None).dtype == spelled.strip().lower()
    cfg = TrainConfig(data=["x"], out="o", config="gpt2-tiny", dtype=spelled)
    cfg.validate()
    assert cfg.dtype == str(expected).removeprefix("torch.")


def test_none_and_auto_keep_their_documented_meanings():
    # gpt2lab.load: None -> the device's default; "auto" -> a half-precision checkpoint's own, else the default
    assert resolve_dtype(None, CPU) == torch.float32
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", CPU, stored=torch.float16) == torch.float16
    assert resolve_dtype("auto", CPU, stored=torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", CPU, stored=torch.float64) == torch.float32
    assert resolve_dtype(None, CPU, stored=torch.float16) == torch.float32  # None never reads the checkpoint
    assert resolve_dtype("auto", CPU, stored=lambda: torch.float16) == torch.float16
    assert resolve_dtype("bf16", CPU, stored=lambda: pytest.fail("read only for auto")) == torch.bfloat16
    # checkpoints.load_model / Generator.save: None stays None (the caller's default), "auto" the stored dtype
    assert storage_dtype(None, lambda: torch.float16) is None
    assert storage_dtype("auto", lambda: torch.float16) == torch.float16
    assert storage_dtype(torch.float64, lambda: torch.float16) == torch.float64
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(" CPU ") == CPU


def test_bf16_is_a_dtype_and_a_quantization_each_with_its_own_meaning():
    assert parse_dtype("bf16") == torch.bfloat16  # every tensor and the arithmetic in bfloat16
    assert check_quantization("bf16") == "bf16"  # only the linear weights stored in bfloat16
    assert check_quantization("INT8") == "int8"
    assert check_quantization(None) is None
    assert set(QUANTIZATIONS) >= {"int8", "bf16"}
    assert gpt2lab.model.QUANTIZATIONS is QUANTIZATIONS  # the model package re-exports the vocabulary's
    assert gpt2lab.model.check_quantization is check_quantization


@pytest.mark.parametrize("bad", ["int4", "float64", "", "bfloat", 16])
def test_a_wrong_dtype_names_the_parameter_and_the_choices(bad):
    for name in ("dtype", "--dtype", "--save-dtype"):
        with pytest.raises(ValueError, match=rf"^{name} must be one of auto, float32, bfloat16, float16 .*got"):
            dtype_name(bad, name)
    with pytest.raises(ValueError, match=r"^--save-dtype must be one of float32, bfloat16, float16 "):
        dtype_name(bad, "--save-dtype", auto=False)
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        resolve_dtype(bad, CPU)
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        parse_dtype(torch.float64)  # a torch dtype no front end computes in


def test_auto_is_not_a_storage_dtype_for_training():
    with pytest.raises(ValueError, match=r"^--save-dtype must be one of float32, bfloat16, float16"):
        TrainConfig(data=["x"], out="o", config="gpt2-tiny", save_dtype="auto").validate()
    cfg = TrainConfig(data=["x"], out="o", config="gpt2-tiny", save_dtype="fp16")
    cfg.validate()
    assert cfg.save_dtype == "float16"


def test_every_front_end_refuses_a_wrong_name_naming_its_own_parameter(tiny_checkpoint, tmp_path):
    def raises(match, call, *args, **kwargs):
        with pytest.raises(ValueError, match=match):
            call(*args, **kwargs)

    # the library
    raises(r"^dtype must be one of auto, float32", gpt2lab.load, tiny_checkpoint, device="cpu", dtype="int4")
    raises(r"^device must be one of auto, cpu, cuda", gpt2lab.load, tiny_checkpoint, device="gpu")
    raises(r"^quantization must be None or one of 'int8', 'bf16', 'int4'", gpt2lab.load, tiny_checkpoint,
           quantization="int3")
    raises(r"^dtype must be one of auto, float32", load_model, tiny_checkpoint, dtype="int4")
    raises(r"^quantization must be None or one of", load_model, tiny_checkpoint, quantization="fp8")
    # the server (checked when the app is made, before the engine thread loads anything)
    raises(r"^dtype must be one of auto, float32", ServerState.create, tiny_checkpoint, dtype="int4")
    raises(r"^device must be one of auto, cpu", ServerState.create, tiny_checkpoint, device="gpu")
    raises(r"^quantization must be None or one of", ServerState.create, tiny_checkpoint, quantization="fp8")
    # the CLI
    raises(r"^--dtype must be one of auto, float32", build_runtime, "cpu", "int4", None, None)
    raises(r"^--device must be one of auto, cpu", build_runtime, "gpu", None, None, None)
    raises(r"^--quantization must be one of none, int8, bf16", build_runtime, "cpu", None, "fp8", None)
    # training
    raises(r"^--dtype must be one of auto, float32",
           TrainConfig(data=["x"], out="o", config="gpt2-tiny", dtype="int4").validate)
    raises(r"^--device must be one of auto, cpu",
           TrainConfig(data=["x"], out="o", config="gpt2-tiny", device="gpu").validate)


def test_load_and_load_model_read_auto_as_documented(tmp_path, tiny_checkpoint):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(tiny_checkpoint, half)
    config = json.loads((half / "config.json").read_text())
    config["torch_dtype"] = "float16"
    (half / "config.json").write_text(json.dumps(config))
    assert gpt2lab.load(half, device="cpu", dtype="auto").model.wte.weight.dtype == torch.float16
    assert gpt2lab.load(half, device="cpu", dtype="AUTO").model.wte.weight.dtype == torch.float16
    assert gpt2lab.load(half, device="cpu").model.wte.weight.dtype == torch.float32  # None: the CPU's default
    assert gpt2lab.load(half, device="cpu", dtype="bf16").model.wte.weight.dtype == torch.bfloat16
    assert load_model(half, dtype="auto").wte.weight.dtype == torch.float16
    assert load_model(half).wte.weight.dtype == torch.float32  # None: float32 (transformers' default)


def test_the_dtype_tables_live_in_one_module():
    import re
    from pathlib import Path

    src = Path(placement.__file__).parent
    table = re.compile(r"\{\s*\"(float32|bfloat16|float16|fp32|bf16|fp16)\"\s*:")
    holders = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if table.search(p.read_text()))
    assert holders == ["placement.py"]


def test_torch_threads_sets_the_count_inside_and_puts_it_back():
    from gpt2lab.placement import torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), torch_threads(1):  # put back when the block raises too
            raise KeyError("x")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
