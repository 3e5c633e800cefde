"""LoRA adapters applied per request (gpt2lab.model.multi_lora): rows of different adapters and of the base model
share one batch, each adding its own low-rank products to the base model's, and each gives what it gives alone,
what peft gives, and (greedy) what the adapter merged into the weights gives."""

from __future__ import annotations

import pytest
import torch

import gpt2lab
from gpt2lab.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived", "Hello"]


@pytest.fixture(scope="module")
def served(tiny_checkpoint, lora_adapters):
    """The tiny model with both adapters loaded, unmerged."""
    gen = gpt2lab.load(tiny_checkpoint)
    for name, path in lora_adapters.items():
        gen.load_lora_adapter(name, path)
    return gen


def _peft(base, adapter, merged: bool):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter).eval()
    return model.merge_and_unload().eval() if merged else model


def _greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=50256)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["ad-qkv", "ad-all"])
def test_an_adapter_request_equals_peft_unmerged_and_merged_and_the_merged_load(served, tiny_checkpoint,
                                                                               lora_adapters, name):
    base_ids = served.tokenizer.encode(PROMPTS[0])
    # its logits are peft's (unmerged: the same arithmetic, to rounding), not the base model's
    peft_model = _peft(tiny_checkpoint, lora_adapters[name], merged=False)
    with torch.no_grad():
        theirs = peft_model(torch.tensor([base_ids])).logits[0]
    assert (served.logits(base_ids, adapter=name) - theirs).abs().max() < 1e-4
    assert (served.logits(base_ids) - theirs).abs().max() > 0.1  # the adapter matters
    for prompt in PROMPTS:
        ids = served.tokenizer.encode(prompt)
        mine = served.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True, adapter=name)[0].token_ids
        assert mine == _greedy(peft_model, ids, 12), prompt
        assert mine == _greedy(_peft(tiny_checkpoint, lora_adapters[name], merged=True), ids, 12), prompt
        # gpt2lab.load(base, adapter=dir) merges it into the weights: other rounding, the same greedy text here
        merged = gpt2lab.load(tiny_checkpoint, adapter=lora_adapters[name])
        assert merged.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True)[0].token_ids == mine
        assert mine != served.generate(prompt, max_new_tokens=12, temperature=0, ignore_eos=True)[0].token_ids


def test_rows_of_different_adapters_in_one_batch_give_what_each_gives_alone(served):
    """Seeded sampling, bit for bit: tokens and logprobs of every row equal the same request run alone."""
    params = SamplingParams(max_new_tokens=10, seed=5, logprobs=1, ignore_eos=True)
    plan = [(p, a) for p in PROMPTS for a in (None, "ad-qkv", "ad-all")]
    alone = {}
    for prompt, adapter in plan:
        (c,) = served.generate(prompt, params, adapter=adapter)
        alone[prompt, adapter] = (c.token_ids, [t.logprob for t in c.logprobs])
    runner = served.runner()
    for i, (prompt, adapter) in enumerate(plan):
        runner.add(served.encode_prompt(prompt), params, request_id=str(i), adapter=adapter)
    runner.run()
    for i, key in enumerate(plan):
        (c,) = runner.completions(str(i))
        assert (c.token_ids, [t.logprob for t in c.logprobs]) == alone[key], key
    assert len({tuple(alone[PROMPTS[1], a][0]) for a in (None, "ad-qkv", "ad-all")}) == 3  # three different texts


def test_unload_lets_running_requests_finish_and_frees_the_slot(tiny_checkpoint, lora_adapters):
    gen = gpt2lab.load(tiny_checkpoint)
    gen.load_lora_adapter("a", lora_adapters["ad-qkv"])
    expected = gen.generate(PROMPTS[1], max_new_tokens=8, seed=1, adapter="a")[0].token_ids
    runner = gen.runner()
    runner.add(gen.encode_prompt(PROMPTS[1]), SamplingParams(max_new_tokens=8, seed=1), request_id="r", adapter="a")
    runner.step()  # admitted and running
    gen.unload_lora_adapter("a")
    assert gen.lora_adapters() == [] and len(gen.lora.slots) == 1  # gone by name, still held by its row
    with pytest.raises(ValueError, match="adapter 'a' is not loaded"):
        runner.add(gen.encode_prompt("x"), SamplingParams(max_new_tokens=2), adapter="a")
    runner.run()
    assert runner.completions("r")[0].token_ids == expected
    assert gen.lora.slots == []  # freed with its last row
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        gen.unload_lora_adapter("a")


def test_aborted_and_waiting_requests_give_their_adapter_back(tiny_checkpoint, lora_adapters):
    gen = gpt2lab.load(tiny_checkpoint)
    gen.load_lora_adapter("a", lora_adapters["ad-qkv"])
    engine = gen.engine(max_batch=1)
    params = SamplingParams(max_new_tokens=50, n=2)
    engine.add_request(gen.encode_prompt("x"), params, "r1", adapter="a")  # two rows: only one fits
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1 and gen.lora.slots[0].users == 2
    engine.abort("r1")
    assert gen.lora.slots[0].users == 0 and not engine.has_unfinished()


def test_bad_adapters_are_refused_naming_the_problem(tmp_path, tiny_checkpoint, lora_adapters):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    gen = gpt2lab.load(tiny_checkpoint)
    with pytest.raises(ValueError, match="adapter 'nope' is not loaded"):
        gen.generate("x", max_new_tokens=2, adapter="nope")
    gen.load_lora_adapter("a", lora_adapters["ad-qkv"])
    with pytest.raises(ValueError, match="already loaded"):
        gen.load_lora_adapter("a", lora_adapters["ad-all"])
    broken = tmp_path / "rank"  # r in the config says 8, the tensors are rank 4
    shutil.copytree(lora_adapters["ad-qkv"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"rank.*shape \(4, 64\), expected \(8, 64\)") as info:
        gen.load_lora_adapter("b", broken)
    assert str(broken) in str(info.value)
    other = tmp_path / "other"  # a module the model does not have
    shutil.copytree(lora_adapters["ad-qkv"], other)
    state = load_file(other / "adapter_model.safetensors")
    for key in [k for k in state if ".h.0.attn.c_attn." in k]:  # its A and its B
        state[key.replace(".h.0.", ".h.7.")] = state.pop(key)
    save_file(state, other / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="h.7.attn.c_attn"):
        gen.load_lora_adapter("c", other)
    assert gen.lora_adapters() == ["a"]


def test_prompt_logprobs_and_scores_use_the_adapter(served):
    ids = served.tokenizer.encode(PROMPTS[1])
    scored = served.score(ids, adapter="ad-all")
    base = served.score(ids)
    assert [t.logprob for t in scored] != [t.logprob for t in base]
    (c,) = served.generate(PROMPTS[1], max_new_tokens=1, prompt_logprobs=0, adapter="ad-all")
    assert [t.logprob for t in c.prompt_logprobs] == pytest.approx([t.logprob for t in scored], abs=1e-5)


def test_pytorch_path_adds_the_same_deltas(tiny_checkpoint, lora_adapters):
    """Where the kernels do not run (a GPU; here a user's forward hook, which only the PyTorch code calls), forward
    hooks add the deltas: peft's output."""
    gen = gpt2lab.load(tiny_checkpoint)
    gen.load_lora_adapter("a", lora_adapters["ad-all"])
    seen = []
    user_hook = gen.model.ln_f.register_forward_hook(lambda module, inputs, out: seen.append(out.shape))
    with torch.inference_mode():
        assert gpt2lab.runtime.inference_runner(gen.model) is None
    ids = gen.tokenizer.encode(PROMPTS[0])
    mine = gen.generate(PROMPTS[0], max_new_tokens=10, temperature=0, ignore_eos=True, adapter="a")[0].token_ids
    assert seen  # the PyTorch code ran
    assert mine == _greedy(_peft(tiny_checkpoint, lora_adapters["ad-all"], merged=False), ids, 10)
    user_hook.remove()
    assert not any(m._forward_hooks for m in gen.model.modules())  # the LoRA hooks were for that forward only
