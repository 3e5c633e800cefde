"""Fast by default: a loaded model decodes through gpt2lab's kernels with no extra call, gives the
same numbers as its PyTorch code, follows its weights when they change, and still trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gpt2lab
from gpt2lab import kernels, runtime
from gpt2lab.checkpoints import load_model
from gpt2lab.model import InferenceOnlyError, optimize_for_inference
from gpt2lab.runtime import KernelRunner, huge_pages, inference_runner

from .conftest import SHAPES, make_hf_checkpoint

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="gpt2lab's C kernels did not build here")


def _open_blocks(model) -> int:
    """How many runtime.unchanged_weights blocks are open on ``model`` (the runtime's own record of them)."""
    state = runtime._states.get(model)
    return 0 if state is None else state.blocks


@pytest.fixture(scope="module", params=list(SHAPES) + ["untied"])
def model(request, tmp_path_factory):
    shape = dict(SHAPES["tiny"], tie_word_embeddings=False) if request.param == "untied" else SHAPES[request.param]
    return load_model(make_hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=7, **shape))


@needs_kernels
def test_the_runner_is_chosen_only_for_inference(model):
    model.eval()
    with torch.no_grad():
        runner = inference_runner(model)
        assert isinstance(runner, KernelRunner)
        assert inference_runner(model) is runner  # reused while the weights are the same tensors
    assert inference_runner(model) is None  # autograd on: the PyTorch code (gradients need it)
    model.train()
    with torch.no_grad():
        assert inference_runner(model) is None  # training mode (dropout)
    model.eval()


@needs_kernels
def test_cached_forward_matches_the_torch_forward(model):
    """Prefill + decode through the KV cache (uniform and ragged rows, logits_index, a row offset)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 30), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        full = model(ids)  # [3, 30, V], uncached: GPT2's PyTorch code
        model.setup_cache(max_batch=4, max_seq=32)
        assert inference_runner(model) is not None
        rows = slice(1, 4)  # not starting at row 0
        pos = torch.arange(20)[None].expand(3, 20)
        last = runtime.forward(model, ids[:, :20], input_pos=pos, rows=rows, logits_index=torch.tensor([19, 19, 19]))
        assert (last - full[:, 19]).abs().max() < 1e-4
        for t in range(20, 24):  # every row at the same position
            step = runtime.forward(model, ids[:, t:t + 1], input_pos=torch.full((3, 1), t), rows=rows)
            assert (step[:, 0] - full[:, t]).abs().max() < 1e-4
        lens = torch.tensor([24, 26, 28])  # ragged: rows at different positions in one step
        for r in (1, 2):
            for t in range(24, int(lens[r])):
                one = slice(rows.start + r, rows.start + r + 1)
                runtime.forward(model, ids[r:r + 1, t:t + 1], input_pos=torch.tensor([[t]]), rows=one)
        step = runtime.forward(model, ids[torch.arange(3), lens][:, None], input_pos=lens[:, None], rows=rows)
        for r in range(3):
            assert (step[r, 0] - full[r, lens[r]]).abs().max() < 1e-4
        model.setup_cache(max_batch=4, max_seq=32)  # a second prefill chunk starting past 0
        runtime.forward(model, ids[:, :10], input_pos=torch.arange(10)[None].expand(3, 10))
        chunk = runtime.forward(model, ids[:, 10:16], input_pos=torch.arange(10, 16)[None].expand(3, 6))
        assert (chunk - full[:, 10:16]).abs().max() < 1e-4


def _two_models(tmp_path):
    """Model a (seed 1), model b's next-token logits for 12 ids (``want``), and a function giving a's
    through the kernels (a prefill of the 12 ids): a test of which weights the kernels read."""
    model = load_model(make_hf_checkpoint(tmp_path / "a", seed=1, **SHAPES["tiny"]))
    other = load_model(make_hf_checkpoint(tmp_path / "b", seed=2, **SHAPES["tiny"]))
    ids = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = other(ids)[0, -1]

    def last_logits():
        with torch.no_grad():
            model.setup_cache(max_batch=1, max_seq=16)
            return runtime.forward(model, ids, input_pos=torch.arange(12)[None], logits_index=torch.tensor([11]))[0]

    return model, other, want, last_logits


@needs_kernels
def test_the_runner_follows_replaced_and_rewritten_weights(tmp_path):
    """load_state_dict copying in place, and with assign=True (new tensors): the kernels see the new weights."""
    model, other, want, last_logits = _two_models(tmp_path)
    before = last_logits()
    assert (before - want).abs().max() > 1e-2
    model.load_state_dict(other.state_dict())  # copies into the same tensors
    assert (last_logits() - want).abs().max() < 1e-4
    model.load_state_dict(load_model(tmp_path / "a").state_dict(), assign=True)  # new tensors
    assert torch.equal(last_logits(), before)


@needs_kernels
def test_unchanged_weights_checks_once_and_recheck_weights_follows_a_replacement(tmp_path):
    """Inside runtime.unchanged_weights the runner is checked at the first forward only (the promise is the
    caller's: a tensor replaced without recheck_weights is not seen); recheck_weights and leaving the block
    bring the check back."""
    model, other, want, last_logits = _two_models(tmp_path)
    before = last_logits()
    with runtime.unchanged_weights(model), runtime.unchanged_weights(model):  # blocks nest
        assert torch.equal(last_logits(), before)
        model.load_state_dict(other.state_dict(), assign=True)  # new tensors, the promise broken
        assert torch.equal(last_logits(), before)  # not checked again: the old tensors are still read
        runtime.recheck_weights(model)
        assert (last_logits() - want).abs().max() < 1e-4
        model.load_state_dict(load_model(tmp_path / "a").state_dict(), assign=True)
    assert _open_blocks(model) == 0
    assert torch.equal(last_logits(), before)  # checked again outside the block


@needs_kernels
def test_a_nested_unchanged_weights_block_checks_again(tmp_path):
    """A server "call" runs inside the engine thread's block: one that swaps the weights and then generates
    (generate() opens its own block) must generate with the new weights, not the runner of the old ones."""
    from gpt2lab.generation.generator import load

    generator = load(str(make_hf_checkpoint(tmp_path / "a", seed=1, **SHAPES["tiny"])))
    other = load(str(make_hf_checkpoint(tmp_path / "b", seed=2, **SHAPES["tiny"])))
    model = generator.model
    with torch.inference_mode():
        want = other.generate("Hello there", max_new_tokens=8, temperature=0)[0].token_ids
        before = generator.generate("Hello there", max_new_tokens=8, temperature=0)[0].token_ids
        assert before != want  # the two models tell apart
        with runtime.unchanged_weights(model):  # the engine thread's
            assert generator.generate("Hello there", max_new_tokens=8, temperature=0)[0].token_ids == before
            model.load_state_dict(other.model.state_dict(), assign=True)
            assert generator.generate("Hello there", max_new_tokens=8, temperature=0)[0].token_ids == want
        assert _open_blocks(model) == 0


@needs_kernels
def test_bad_ids_and_positions_raise_before_any_work_and_shapes_alternate(tmp_path):
    """The C code checks token ids and positions (negative and huge too) before touching the KV cache; plans
    kept per shape serve prefills and decodes of alternating shapes, cache rows and thread counts, and a
    call's logits are its own (the next call does not write into them)."""
    model = load_model(make_hf_checkpoint(tmp_path, seed=1, **SHAPES["tiny"]))
    ref = load_model(tmp_path)
    threads = torch.get_num_threads()
    ids = torch.randint(0, 50257, (4, 22), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ref(ids)  # PyTorch, uncached
        model.setup_cache(max_batch=4, max_seq=24)
        runtime.forward(model, torch.tensor([[5, 6, 7]]), input_pos=torch.arange(3)[None], rows=slice(1, 2))
        caches = [(c.k.clone(), c.v.clone()) for c in model.caches()]
        for token, pos in [(-1, 3), (50257, 3), (2**40, 3), (-(2**40), 3)]:
            with pytest.raises(IndexError, match=r"token ids must be in \[0, 50257\)"):
                runtime.forward(model, torch.tensor([[1], [token]]), input_pos=torch.tensor([[3], [pos]]),
                                rows=slice(1, 3))
        for pos in (-1, 24, 2**62, -(2**62)):
            with pytest.raises(ValueError, match="beyond the KV cache"):
                runtime.forward(model, torch.tensor([[1], [2]]), input_pos=torch.tensor([[3], [pos]]), rows=slice(1, 3))
        assert all(torch.equal(c.k, k) and torch.equal(c.v, v) for c, (k, v) in zip(model.caches(), caches))
        kept = []
        try:
            shapes = [(1, 4, 6, 0), (2, 2, 9, 1), (1, 4, 6, 0), (2, 1, 20, 3)]  # threads, rows, length, first row
            for step, (n_threads, rows, T, first) in enumerate(shapes):
                torch.set_num_threads(n_threads)
                if step == 3:
                    model.setup_cache(max_batch=6, max_seq=40)  # grown between calls: new caches, new plan
                out = runtime.forward(model, ids[first:first + rows, :T],
                                      input_pos=torch.arange(T)[None].expand(rows, T), rows=slice(first, first + rows))
                assert (out - full[first:first + rows, :T]).abs().max() < 1e-4
                kept.append((out, out.clone()))
                for p in range(T, T + 2):  # decode steps, alternating with the prefills' shapes
                    step_out = runtime.forward(model, ids[first:first + rows, p:p + 1],
                                               input_pos=torch.full((rows, 1), p), rows=slice(first, first + rows))
                    assert (step_out[:, 0] - full[first:first + rows, p]).abs().max() < 1e-4
                    kept.append((step_out, step_out.clone()))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in kept)


@needs_kernels
def test_a_failed_generate_leaves_no_unchanged_weights_block_behind(tmp_path):
    """generate() raising inside its unchanged_weights block (NaN logits) ends the block: weights swapped
    afterwards are the ones the next generate() uses."""
    from gpt2lab.generation.generator import load

    generator = load(str(make_hf_checkpoint(tmp_path / "a", seed=1, **SHAPES["tiny"])))
    other = load(str(make_hf_checkpoint(tmp_path / "b", seed=2, **SHAPES["tiny"])))
    model = generator.model
    with torch.no_grad():
        want = other.generate("Hello there", max_new_tokens=6, temperature=0)[0].token_ids
        model.ln_f.weight[0] = float("nan")
        with pytest.raises(RuntimeError, match="NaN"):
            generator.generate("Hello there", max_new_tokens=6, temperature=0)
        assert _open_blocks(model) == 0
        model.load_state_dict(other.model.state_dict(), assign=True)
        assert generator.generate("Hello there", max_new_tokens=6, temperature=0)[0].token_ids == want


@needs_kernels
def test_stream_uses_weights_replaced_between_its_tokens(tmp_path, monkeypatch):
    """stream() holds no unchanged_weights block: weights replaced (load_state_dict(assign=True)) while it is
    paused between two pieces are the ones its next steps read, as in PyTorch's code (kernels switched off),
    seeded sampling with top-k included; and generate() afterwards, in its own block, reads them too."""
    from gpt2lab.generation.generator import load

    a, b = (make_hf_checkpoint(tmp_path / name, seed=seed, **SHAPES["tiny"]) for name, seed in (("a", 1), ("b", 2)))
    states = [load(str(path)).model.state_dict() for path in (a, b)]
    kw = dict(max_new_tokens=12, ignore_eos=True, seed=4, top_k=3, temperature=0.7)

    def run(swaps: bool) -> tuple[list[str], list[int]]:
        generator = load(str(a))
        pieces, stream = [], generator.stream("Hello there", **kw)
        for i, piece in enumerate(stream):
            pieces.append(piece)
            if swaps and i in (1, 4):  # to b's weights, then back to a's (new tensors each time)
                generator.model.load_state_dict({k: v.clone() for k, v in states[i == 1].items()}, assign=True)
        if swaps:
            generator.model.load_state_dict({k: v.clone() for k, v in states[1].items()}, assign=True)
        return pieces, generator.generate("Hello there", **kw)[0].token_ids

    plain, swapped = run(False), run(True)
    monkeypatch.setattr(kernels, "available", lambda: False)  # PyTorch's forward and sampling code
    with torch.no_grad():
        assert inference_runner(load_model(a).eval()) is None
    assert run(True) == swapped
    assert swapped[0] != plain[0] and swapped[1] == load(str(b)).generate("Hello there", **kw)[0].token_ids


@needs_kernels
def test_generators_on_two_threads_give_what_they_give_alone(tmp_path):
    """Two Generators generating at the same time on two threads (each in its own unchanged_weights block, each
    runner with its own scratch): every call gives the tokens and logprobs of a lone call."""
    import threading

    from gpt2lab.generation.generator import load

    gens = [load(str(make_hf_checkpoint(tmp_path / name, seed=seed, **shape)))
            for name, seed, shape in (("a", 1, SHAPES["tiny"]), ("b", 2, SHAPES["wide"]))]
    kw = dict(max_new_tokens=16, seed=5, n=2, top_k=20, top_p=0.9, repetition_penalty=1.2, logprobs=2,
              ignore_eos=True)

    def result(generator):
        completions = generator.generate(["Hello", "The sea"], **kw)
        return [(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in completions]

    alone = [result(g) for g in gens]
    got: dict[int, list] = {0: [], 1: []}

    def work(i):
        for _ in range(3):
            got[i].append(result(gens[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {i: [alone[i]] * 3 for i in (0, 1)}


@pytest.mark.parametrize("name", ["ln_f.weight", "h.0.ln_1.bias", "h.1.mlp.c_fc.weight", "wpe.weight"])
def test_a_tensor_replaced_with_another_shape_raises_instead_of_being_read(tmp_path, name):
    """The kernels index memory by the config's shapes: a tensor of another shape must send the forward
    to PyTorch's code (a clear error), never let C read past its end (it used to return logits)."""
    model = load_model(make_hf_checkpoint(tmp_path / "a", seed=1, **SHAPES["tiny"]))
    ids = torch.randint(0, 50257, (1, 4), generator=torch.Generator().manual_seed(2))
    model.setup_cache(max_batch=1, max_seq=8)
    with torch.no_grad():
        runtime.forward(model, ids, input_pos=torch.arange(4)[None])  # the kernels ran on the good weights
        *path, last = name.split(".")
        owner = model.get_submodule(".".join(path))
        setattr(owner, last, torch.nn.Parameter(torch.ones(3, *getattr(owner, last).shape[1:])))
        assert inference_runner(model) is None
        with pytest.raises((RuntimeError, IndexError)):
            runtime.forward(model, ids, input_pos=torch.arange(4)[None])


def test_a_model_used_for_generation_still_fine_tunes(tiny_checkpoint):
    """Generate, train a few steps, generate again: the loss falls, and generation (through the
    kernels) follows the new weights exactly as the PyTorch forward of the trained model predicts."""
    gen = gpt2lab.load(tiny_checkpoint)
    prompt = "Hello there"
    before = gen.generate(prompt, max_new_tokens=8, temperature=0.0, ignore_eos=True)[0].token_ids
    model = gen.model
    target = torch.tensor([gen.tokenizer.encode(" the sea the sea the sea the sea the sea the sea")])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        logits = model(target[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), target[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    model.eval()
    after = gen.generate(prompt, max_new_tokens=8, temperature=0.0, ignore_eos=True)[0].token_ids
    assert after != before
    ids = gen.encode_prompt(prompt)  # greedy decoding with the plain, uncached forward
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert after == ids[-8:]


def test_optimize_for_inference_is_kept_as_a_harmless_call(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    model.train()
    assert optimize_for_inference(model, batch_size=8) is model and not model.training
    model.train()  # and the model still trains
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        optimize_for_inference(model, batch_size=0)
    with pytest.raises(TypeError, match="expects a gpt2lab GPT2"):
        optimize_for_inference(torch.nn.Linear(2, 2))


def test_a_quantized_model_refuses_training(tiny_checkpoint):
    gen = gpt2lab.load(tiny_checkpoint, quantization="int8")
    with pytest.raises(InferenceOnlyError, match="int8-quantized.*without quantization"):
        gen.model.train()
    assert not gen.model.training
    assert not any(p.requires_grad for p in gen.model.parameters())


@needs_kernels
def test_a_model_with_lora_adapters_generates_through_its_own_modules(tiny_checkpoint):
    """LoRA wrappers (unmerged adapters, as during LoRA training) have their own forward: the cached forward
    must run it (it used to raise AttributeError: 'LoRALinear' object has no attribute 'weight'), and the
    kernels take over again once the adapters are merged into plain linears."""
    from gpt2lab.model.lora import apply_lora, lora_modules, merge_lora

    gen = gpt2lab.load(tiny_checkpoint)
    prompt = "Hello there"
    before = gen.generate(prompt, max_new_tokens=6, temperature=0.0, ignore_eos=True)[0].token_ids  # kernels
    model = gen.model
    apply_lora(model, rank=4, alpha=8, targets="c_attn,c_fc")
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        assert inference_runner(model) is None
    after = gen.generate(prompt, max_new_tokens=6, temperature=0.0, ignore_eos=True)[0].token_ids
    ids = gen.encode_prompt(prompt)  # greedy decoding with the plain, uncached forward of the adapted model
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert after == ids[-6:] != before
    merge_lora(model)
    with torch.no_grad():
        assert isinstance(inference_runner(model), KernelRunner)


@pytest.mark.skipif(not kernels.available() or not huge_pages.huge_pages_available(),
                    reason="needs the kernels and Linux transparent huge pages")
def test_big_weights_move_to_huge_pages_and_the_model_still_trains(tmp_path, monkeypatch):
    """The first kernel forward moves every tensor of 1 MB or more into 2 MB-aligned huge-page memory in
    place: same Parameter objects (tied weights stay tied), same values, same logits, and the model
    still trains afterwards (the copies are ordinary tensors, not inference-mode ones)."""
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", seed=5, n_layer=1, n_head=2, n_embd=16, n_positions=64)
    gen = gpt2lab.load(ckpt)
    model = gen.model
    wte = model.wte.weight  # 50257 x 16 fp32: 3.2 MB
    before, small = wte.detach().clone(), model.h[0].mlp.c_fc.weight
    small_ptr = small.data_ptr()
    with torch.no_grad():
        reference = model(torch.tensor([[1, 2, 3]]))  # PyTorch forward, before any move
    out = gen.generate("Hello there", max_new_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids
    assert model.wte.weight is wte and wte.data_ptr() % huge_pages.HUGE_PAGE == 0 and torch.equal(wte, before)
    # its storage is exactly its bytes: safetensors saves it (it refuses a view into a larger storage)
    assert wte.untyped_storage().nbytes() == wte.numel() * wte.element_size()
    gen.save(tmp_path / "saved")
    assert torch.equal(gpt2lab.load(tmp_path / "saved").model.wte.weight, before)
    assert small.data_ptr() == small_ptr  # under 1 MB: left where it was
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[1, 2, 3]])), reference)
    model.train()
    loss = model(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).mean()
    loss.backward()  # an inference-mode copy would raise here
    assert wte.grad is not None and wte.grad.abs().sum() > 0
    model.eval()
    assert gen.generate("Hello there", max_new_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids == out

    monkeypatch.setenv("GPT2LAB_HUGE_PAGES", "0")
    other = gpt2lab.load(ckpt)
    other.generate("Hello", max_new_tokens=2)
    assert not huge_pages.on_huge_pages(other.model.wte.weight)


@pytest.mark.skipif(not kernels.available() or not huge_pages.huge_pages_available(),
                    reason="needs the kernels and Linux transparent huge pages")
def test_a_model_saves_and_copies_after_generating(tmp_path):
    """Generation moves big weights to huge pages and caches a runner on the model: neither may stop a save
    (safetensors refused tensors that were views into a larger mapping), a torch.save of the state dict
    from carrying the mapping's slack, a deepcopy (the runner's ctypes pointers cannot be copied) or a pickle."""
    import copy
    import io
    import pickle

    ckpt = make_hf_checkpoint(tmp_path / "ckpt", seed=5, n_layer=1, n_head=2, n_embd=16, n_positions=64)
    gen = gpt2lab.load(ckpt)
    out = gen.generate("Hello there", max_new_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids
    assert huge_pages.on_huge_pages(gen.model.wte.weight)
    saved = gpt2lab.load(gen.save(tmp_path / "saved"))
    assert saved.generate("Hello there", max_new_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids == out
    buffer = io.BytesIO()
    torch.save(gen.model.state_dict(), buffer)
    raw = sum(t.numel() * t.element_size() for t in gen.model.state_dict().values())
    assert buffer.tell() < raw + 1_000_000  # no 2 MB of slack per moved tensor
    twin = copy.deepcopy(gen.model)
    assert torch.equal(twin.wte.weight, gen.model.wte.weight)
    gen.model = twin
    assert gen.generate("Hello there", max_new_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids == out
    # the whole model pickles too, as multiprocessing does (its activation was a lambda: "Can't pickle <lambda>")
    gen.model = pickle.loads(pickle.dumps(gen.model))
    assert gen.generate("Hello there", max_new_tokens=4, temperature=0.0, ignore_eos=True)[0].token_ids == out


@needs_kernels
def test_forward_hooks_on_submodules_fire_during_generation(tiny_checkpoint):
    """A hook on a block (activation capture, steering) runs the modules' own code, as it did before the
    kernels (which call no module); once removed, the kernels take over again."""
    gen = gpt2lab.load(tiny_checkpoint)
    prompt = "Hello there"
    plain = gen.generate(prompt, max_new_tokens=5, temperature=0.0, ignore_eos=True)[0].token_ids
    seen = []
    steer = torch.randn(gen.config.n_embd, generator=torch.Generator().manual_seed(0)) * 20
    handle = gen.model.h[1].register_forward_hook(lambda module, args, out: seen.append(1) or out + steer)
    steered = gen.generate(prompt, max_new_tokens=5, temperature=0.0, ignore_eos=True)[0].token_ids
    assert len(seen) == 5 and steered != plain  # a prefill and four decode steps, each through the hook
    handle.remove()
    with torch.no_grad():
        assert isinstance(inference_runner(gen.model), KernelRunner)
    from torch.nn.modules.module import register_module_forward_pre_hook

    calls = []
    handle = register_module_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            assert inference_runner(gen.model) is None
    finally:
        handle.remove()
    assert gen.generate(prompt, max_new_tokens=5, temperature=0.0, ignore_eos=True)[0].token_ids == plain


@needs_kernels
def test_the_runtime_keeps_nothing_on_the_model(tiny_checkpoint):
    """The runner, the watch on its weights and the unchanged_weights blocks live in gpt2lab.runtime, keyed weakly
    by the model: after cached forwards the model has the attributes of a fresh one (it carried the runner and
    a __getstate__ that dropped it), deep-copies and pickles into a model that runs alike, and is freed once
    dropped (nothing the runtime keeps holds it)."""
    import copy
    import gc
    import pickle
    import weakref

    fresh = set(vars(load_model(tiny_checkpoint)))
    model = load_model(tiny_checkpoint).eval()
    ids = torch.tensor([[464, 2068, 7586, 21831]])

    def run(m) -> torch.Tensor:
        m.setup_cache(max_batch=1, max_seq=8)
        return runtime.forward(m, ids, input_pos=torch.arange(4)[None])

    with torch.no_grad():
        with runtime.unchanged_weights(model):
            logits = run(model)
            assert isinstance(inference_runner(model), KernelRunner)
        assert set(vars(model)) == fresh
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert set(vars(twin)) == fresh
            assert torch.equal(run(twin), logits)
            assert inference_runner(twin) is not inference_runner(model)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_the_names_that_moved_out_of_gpt2lab_model_still_import_with_a_warning():
    import gpt2lab.model

    for name, new in [("kernels", kernels), ("KernelRunner", KernelRunner), ("inference_runner", inference_runner)]:
        with pytest.warns(DeprecationWarning, match=f"gpt2lab.model.{name} is deprecated: use gpt2lab"):
            assert getattr(gpt2lab.model, name) is new
    with pytest.warns(DeprecationWarning, match="use gpt2lab.runtime.inference_runner"):
        from gpt2lab.model import inference_runner as old
    assert old is inference_runner
    with pytest.raises(AttributeError, match="has no attribute 'fast'"):
        gpt2lab.model.fast  # noqa: B018 - the attribute access is the test
    assert not {"kernels", "KernelRunner", "inference_runner"} & set(gpt2lab.model.__all__)
