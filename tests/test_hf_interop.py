"""Hugging Face artifacts in and out, with the real libraries: sharded checkpoints (local and from a Hub
cache), checkpoint dtypes, generation_config.json, transformers' argument names, GPT2LMHeadModel
objects, saved folders that transformers and AutoTokenizer read, and peft adapters both ways."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab.checkpoints import load_model, resolve_model
from gpt2lab.checkpoints.io import checkpoint_dtype, weight_files
from gpt2lab.checkpoints.resolve import choose_weight_file
from gpt2lab.sampling import hf_compat

from .conftest import SHAPES, make_hf_checkpoint

IDS = [464, 2068, 7586, 21831, 18045, 625, 262]
PROMPT = "The quick brown fox"


def _hf(path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path).eval()


def _hf_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("base"), seed=3, **SHAPES["tiny"])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, base) -> dict[str, Path]:
    """The same weights saved four ways: safetensors shards by transformers, .bin shards by huggingface_hub."""
    from huggingface_hub import save_torch_state_dict

    root = tmp_path_factory.mktemp("sharded")
    model = _hf(base)
    st = root / "st"
    model.save_pretrained(st, max_shard_size="300KB")
    binary = root / "bin"
    shutil.copytree(base, binary, ignore=shutil.ignore_patterns("*.safetensors"))
    save_torch_state_dict(model.state_dict(), binary, max_shard_size="300KB", safe_serialization=False)
    return {"st": st, "bin": binary}


# -- Hugging Face in ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["st", "bin"])
def test_sharded_checkpoints_load_with_equal_logits(sharded, base, kind):
    folder = sharded[kind]
    index = folder / ("model.safetensors.index.json" if kind == "st" else "pytorch_model.bin.index.json")
    assert index.is_file() and len(weight_files(folder)) > 1
    assert not (folder / "model.safetensors").exists() and not (folder / "pytorch_model.bin").exists()
    ours = gpt2lab.load(folder).logits(IDS)
    assert torch.equal(ours, gpt2lab.load(base).logits(IDS))
    assert (ours - _hf_logits(_hf(base))).abs().max() < 1e-4


def test_missing_shard_is_named(tmp_path, sharded):
    folder = shutil.copytree(sharded["st"], tmp_path / "broken")
    shard = weight_files(folder)[-1]
    shard.unlink()
    with pytest.raises(gpt2lab.checkpoints.CheckpointError, match=f"shard {shard.name} not found"):
        load_model(folder)


def _cache_repo(cache: Path, repo_id: str, files_from: Path) -> Path:
    """A Hugging Face cache entry in huggingface_hub's documented layout: blobs, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_sharded_checkpoint_from_the_hub_cache(tmp_path, monkeypatch, sharded, base):
    """A sharded Hub repo in the local cache (HF_HUB_OFFLINE=1): the index and every shard are found."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _cache_repo(cache, "someone/tiny-sharded", sharded["st"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    resolved = resolve_model("someone/tiny-sharded")
    assert resolved.source == "hub" and (resolved.path / "model.safetensors.index.json").is_file()
    assert torch.equal(gpt2lab.load("someone/tiny-sharded").logits(IDS), gpt2lab.load(base).logits(IDS))
    # an index whose shards are not all cached is not a usable snapshot
    _cache_repo(cache, "someone/half", sharded["st"])
    first = weight_files(sharded["st"])[0].name
    (cache / "models--someone--half" / "snapshots" / "0123456789abcdef0123456789abcdef01234567" / first).unlink()
    with pytest.raises(gpt2lab.checkpoints.ModelNotFoundError):
        resolve_model("someone/half")


def test_hub_download_chooses_the_weights_transformers_would():
    assert choose_weight_file({"model.safetensors", "pytorch_model.bin"}) == "model.safetensors"
    assert choose_weight_file({"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                               "pytorch_model.bin"}) == "model.safetensors.index.json"
    assert choose_weight_file({"pytorch_model.bin.index.json"}) == "pytorch_model.bin.index.json"
    assert choose_weight_file({"config.json"}) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_kept_with_dtype_auto(tmp_path, base, dtype):
    model = _hf(base).to(dtype)
    model.save_pretrained(tmp_path / "half")
    assert checkpoint_dtype(tmp_path / "half") == dtype
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    config.pop("torch_dtype", None), config.pop("dtype", None)  # from the weights alone, too
    (tmp_path / "half" / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(tmp_path / "half") == dtype
    kept = gpt2lab.load(tmp_path / "half", dtype="auto")
    assert all(p.dtype == dtype for p in kept.model.parameters())
    assert gpt2lab.load(tmp_path / "half").model.wte.weight.dtype == torch.float32  # default: upcast
    assert torch.equal(kept.model.wte.weight, model.transformer.wte.weight)


def test_generation_config_gives_defaults_equal_to_transformers(tmp_path, base):
    from transformers import GenerationConfig

    folder = shutil.copytree(base, tmp_path / "greedy5")
    GenerationConfig(do_sample=False, max_new_tokens=5, eos_token_id=50256).save_pretrained(folder)
    gen = gpt2lab.load(folder)
    prompt = "The quick brown fox"
    ids = gen.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = _hf(folder).generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    ref_new = ref[0, len(ids):].tolist()
    out = gen.generate(prompt)[0]
    assert len(out.token_ids) == 5 and out.token_ids == ref_new
    assert gen.generate(prompt, seed=1)[0].token_ids == ref_new  # greedy: the seed changes nothing
    # explicit arguments override the file: either length replaces its max_new_tokens
    assert len(gen.generate(prompt, max_new_tokens=3)[0].token_ids) == 3
    assert len(gen.generate(prompt, max_length=len(ids) + 2)[0].token_ids) == 2
    assert gen.sampling_params(temperature=0.7).temperature == 0.7
    assert gen.sampling_params(do_sample=True).temperature == 1.0
    # written back when saved
    saved = json.loads((gen.save(tmp_path / "saved") / "generation_config.json").read_text())
    assert saved["do_sample"] is False and saved["max_new_tokens"] == 5


def test_transformers_argument_names_are_generation_config_fields():
    from transformers import GenerationConfig

    fields = set(GenerationConfig().to_dict())
    assert set(hf_compat.HF_NAMES) <= fields, set(hf_compat.HF_NAMES) - fields
    for name in ("do_sample", "num_return_sequences", "min_new_tokens", "eos_token_id", "pad_token_id",
                 "bad_words_ids"):
        assert name in hf_compat.HF_NAMES


def test_transformers_argument_names_work(base):
    from transformers import GenerationConfig

    gen = gpt2lab.load(base)
    eos = gen.eos_token_id
    prompt = "Hello there"
    greedy = gen.generate(prompt, temperature=0, max_new_tokens=6)[0].token_ids
    assert gen.generate(prompt, do_sample=False, max_new_tokens=6, pad_token_id=eos)[0].token_ids == greedy
    assert len(gen.generate(prompt, num_return_sequences=3, max_new_tokens=2, seed=0)) == 3
    # bad_words_ids: the greedy path's first token is banned, so the first token changes
    assert gen.generate(prompt, do_sample=False, max_new_tokens=6, bad_words_ids=[[greedy[0]]])[0].token_ids[0] \
        != greedy[0]
    # eos_token_id: another id that ends the completion
    out = gen.generate(prompt, do_sample=False, max_new_tokens=6, eos_token_id=[greedy[2]])[0]
    assert out.token_ids == greedy[:greedy.index(greedy[2]) + 1] and out.finish_reason == "stop"
    # min_new_tokens: EOS made certain by a bias is held back until then
    forced = dict(logit_bias={eos: 100}, do_sample=False, max_new_tokens=8)
    assert gen.generate(prompt, **forced)[0].token_ids == [eos]
    held = gen.generate(prompt, min_new_tokens=4, **forced)[0]
    assert len(held.token_ids) == 5 and held.token_ids[-1] == eos and eos not in held.token_ids[:4]
    # generation_config= (an object or a dict) on generate, stream and generate_text
    config = GenerationConfig(do_sample=False, max_new_tokens=6)
    assert gen.generate(prompt, generation_config=config)[0].token_ids == greedy
    assert "".join(gen.stream(prompt, generation_config={"do_sample": False, "max_new_tokens": 6})) == \
        gen.tokenizer.decode(greedy)
    assert gen.generate_text(prompt, generation_config=config, temperature=0, max_new_tokens=6) == \
        prompt + gen.tokenizer.decode(greedy)
    with pytest.raises(TypeError, match="unknown generation parameter.*min_length"):
        gen.generate(prompt, min_length=3)
    with pytest.raises(TypeError, match="num_return_sequences or n"):
        gen.generate(prompt, n=2, num_return_sequences=2)


def _hf_new_tokens(folder, ids: list[int], **generate_kwargs) -> list[int]:
    with torch.no_grad():
        out = _hf(folder).generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   **generate_kwargs)
    return out[0, len(ids):].tolist()


def test_generation_config_objects_merge_as_transformers_merges_them(tmp_path, base, recwarn):
    """A ``generation_config=`` object sets what it sets over the checkpoint's file (its other fields keep the
    file's values), ``max_new_tokens`` wins over ``max_length`` inside it, and fields gpt2lab does not use are
    ignored with one warning naming them: the tokens transformers' own ``generate`` gives."""
    import warnings

    from transformers import GenerationConfig

    folder = shutil.copytree(base, tmp_path / "greedy")
    GenerationConfig(do_sample=False, max_new_tokens=7, repetition_penalty=1.5, eos_token_id=50256
                     ).save_pretrained(folder)
    gen = gpt2lab.load(folder)
    ids = gen.tokenizer.encode(PROMPT)
    for config in (GenerationConfig(max_new_tokens=3),  # do_sample and the penalty come from the file
                   GenerationConfig(max_length=len(ids) + 9, max_new_tokens=4),  # max_new_tokens wins
                   {"max_new_tokens": 5, "repetition_penalty": 1.0}):
        expected = _hf_new_tokens(folder, ids, generation_config=config if not isinstance(config, dict)
                                  else GenerationConfig(**config))
        assert gen.generate(PROMPT, generation_config=config)[0].token_ids == expected, config
    # fields gpt2lab does not use: one warning naming them, and the rest applies
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate(PROMPT, generation_config={"max_new_tokens": 2, "min_length": 3, "diversity_penalty": 0.5})
    assert len(out[0].token_ids) == 2
    [warning] = [w for w in caught if issubclass(w.category, hf_compat.GenerationConfigWarning)]
    assert "'diversity_penalty', 'min_length'" in str(warning.message) and "generation_config" in str(warning.message)
    with pytest.raises(TypeError, match="unknown generation parameter.*min_length"):  # a keyword stays an error
        gen.generate(PROMPT, min_length=3)


def test_generation_config_file_fields_not_used_are_named_once(tmp_path, base):
    import subprocess
    import sys
    import warnings

    folder = shutil.copytree(base, tmp_path / "odd")
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "do_sample": False,
                                                                "num_beam_groups": 2, "penalty_alpha": 0.6}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = gpt2lab.load(folder)
        gen.generate("Hello")
        gen.generate("Hello")
    named = [str(w.message) for w in caught if issubclass(w.category, hf_compat.GenerationConfigWarning)]
    assert len(named) == 1 and str(folder / "generation_config.json") in named[0]
    assert "'num_beam_groups', 'penalty_alpha'" in named[0]
    from .server_helpers import _env

    r = subprocess.run([sys.executable, "-m", "gpt2lab", "generate", "Hello", "--model", str(folder)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "num_beam_groups" in line]
    assert lines == [f"gpt2lab: warning: {named[0]}"], r.stderr


def test_load_transformers_model_object(tmp_path, base):
    from transformers import GPT2TokenizerFast

    model = _hf(base)
    gen = gpt2lab.load(model)
    assert (gen.logits(IDS) - _hf_logits(model)).abs().max() < 1e-4
    tokenizer = GPT2TokenizerFast.from_pretrained(base)
    gen = gpt2lab.load(model, tokenizer=tokenizer)
    assert gen.tokenizer.encode("Hello world") == tokenizer("Hello world")["input_ids"]
    with torch.no_grad():  # the copy is independent of the object
        model.transformer.wte.weight.zero_()
    assert gen.model.wte.weight.abs().max() > 0
    half = gpt2lab.load(_hf(base).to(torch.bfloat16), dtype="auto")
    assert half.model.wte.weight.dtype == torch.bfloat16
    assert gpt2lab.load(_hf(base).to(torch.bfloat16)).model.wte.weight.dtype == torch.float32


# -- Hugging Face out --------------------------------------------------------------------------------------
def test_saved_folder_is_complete_for_transformers(tmp_path):
    from transformers import AutoTokenizer

    src = make_hf_checkpoint(tmp_path / "ctx1024", seed=4, n_layer=2, n_head=2, n_embd=64, n_positions=1024)
    assert not (src / "tokenizer_config.json").exists()
    gen = gpt2lab.load(src)
    out = gen.save(tmp_path / "saved")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "README.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert (_hf_logits(_hf(out)) - gen.logits(IDS)).abs().max() < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 1024 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer("Hello world")["input_ids"] == gen.tokenizer.encode("Hello world")
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert "gpt2lab" in card.data.tags and str(src) in card.text
    half = gen.save(tmp_path / "half", dtype="float16")
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "float16"


def test_sharded_save_loads_in_transformers_and_back(tmp_path, base):
    gen = gpt2lab.load(base)
    out = gen.save(tmp_path / "sharded", max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    assert (_hf_logits(_hf(out)) - gen.logits(IDS)).abs().max() < 1e-4
    assert torch.equal(gpt2lab.load(out).logits(IDS), gen.logits(IDS))


# -- peft adapters both ways --------------------------------------------------------------------------------
def test_gpt2lab_adapter_loads_in_peft(tmp_path, base):
    from peft import PeftModel

    from gpt2lab.checkpoints.adapters import fill_adapter_dir
    from gpt2lab.model.lora import apply_lora, lora_modules

    gen = gpt2lab.load(base)
    apply_lora(gen.model, rank=4, alpha=8, targets="c_attn,mlp.c_proj,c_fc")
    with torch.no_grad():  # B starts at zero: give it values so the adapter changes the output
        for i, m in enumerate(lora_modules(gen.model).values()):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    (tmp_path / "adapter").mkdir()
    fill_adapter_dir(gen.model, tmp_path / "adapter", str(base), "c_attn,mlp.c_proj,c_fc")
    gen.model.eval()
    ours = gen.logits(IDS)
    peft_model = PeftModel.from_pretrained(_hf(base), tmp_path / "adapter").eval()
    theirs = _hf_logits(peft_model)
    assert (ours - theirs).abs().max() < 1e-4
    assert (theirs - _hf_logits(_hf(base))).abs().max() > 1e-3  # the adapter mattered
    # and back: the folder alone names its base
    adapted = gpt2lab.load(tmp_path / "adapter")
    assert (adapted.logits(IDS) - ours).abs().max() < 1e-5
    # saved, the adapter is merged: a plain GPT-2 folder that transformers loads with the same logits
    merged = adapted.save(tmp_path / "merged")
    assert (_hf_logits(_hf(merged)) - ours).abs().max() < 1e-4
    assert "LoRA adapter is merged" in (merged / "README.md").read_text()


def test_peft_adapter_loads_in_gpt2lab(tmp_path, base):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(_hf(base), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = _hf_logits(peft_model)
    assert (theirs - _hf_logits(_hf(base))).abs().max() > 1e-3
    gen = gpt2lab.load(base, adapter=tmp_path / "peft")
    assert (gen.logits(IDS) - theirs).abs().max() < 1e-4
