"""Fine-tuning and training: data preparation, learning, exact kill/resume, DDP, LoRA, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.checkpoints import load_model
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.training import DataError, TrainConfig, prepare_data, train
from gpt2lab.training.checkpoint import CheckpointDir
from gpt2lab.training.data import split_documents
from gpt2lab.training.optimization import lr_at, param_groups
from gpt2lab.training.sampler import BlockSampler

from .conftest import make_hf_checkpoint, sigkill_after_first_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = "n_layer=2,n_head=2,n_embd=32,n_positions=64"
PATTERN = "the quick brown fox jumps over the lazy dog. "


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _corpus(tmp_path: Path, name: str = "corpus.txt", repeats: int = 80) -> Path:
    path = tmp_path / name
    path.write_text(PATTERN * repeats, encoding="utf-8")
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- data ----------------------------------------------------------------------------------------------
def test_documents_from_txt_folder_jsonl_and_csv(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("first document")
    (folder / "b.txt").write_text("second document")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "third"}) + "\n\n" + json.dumps({"body": "fourth"}) + "\n")
    (tmp_path / "d.csv").write_text('id,content\n1,"fifth, with comma"\n2,sixth\n')
    data = prepare_data([folder, tmp_path / "c.jsonl", tmp_path / "d.csv"], tmp_path / "cache", tokenizer=tokenizer,
                        val_share=0.0, text_field="body", text_column="content", progress=False)
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    eos = tokenizer.eos_token_id
    text = tokenizer.decode(data.train)
    assert text.split("<|endoftext|>") == ["first document", "second document", "third", "fourth",
                                           "fifth, with comma", "sixth", ""]
    assert int(data.train[-1]) == eos and data.meta["train_documents"] == 6
    # a second call reuses the cache (same files, same settings)
    before = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns
    again = prepare_data([folder, tmp_path / "c.jsonl", tmp_path / "d.csv"], tmp_path / "cache", tokenizer=tokenizer,
                         val_share=0.0, text_field="body", text_column="content", progress=False)
    assert (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == before
    assert np.array_equal(again.train, data.train)


def test_validation_holds_out_whole_documents(tmp_path, tokenizer):
    docs = [f"document number {i} " * 5 for i in range(40)] + ["duplicated text"] * 5
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = prepare_data([tmp_path / "docs.jsonl"], tmp_path / "cache", tokenizer=tokenizer, val_share=0.1,
                        progress=False)
    train_docs = set(tokenizer.decode(data.train).split("<|endoftext|>")[:-1])
    val_docs = set(tokenizer.decode(data.val).split("<|endoftext|>")[:-1])
    assert val_docs and not (train_docs & val_docs)
    assert data.meta["val_documents"] + data.meta["train_documents"] == len(docs)
    assert 3 <= data.meta["val_documents"] <= 10  # ~10% of 45, duplicates kept together
    # the split itself: identical texts never straddle it
    train_idx, val_idx = split_documents([1, 2, 2, 3, 4, 5, 6, 7, 8, 9], [1] * 10, 0.3, seed=0)
    assert not ({1, 2} & set(val_idx)) or {1, 2} <= set(val_idx)


def test_single_document_holds_out_its_tail(tmp_path, tokenizer):
    path = _corpus(tmp_path, repeats=50)
    data = prepare_data([path], tmp_path / "cache", tokenizer=tokenizer, val_share=0.1, progress=False)
    everything = tokenizer.encode(path.read_text()) + [tokenizer.eos_token_id]
    assert list(data.train) + list(data.val) == everything
    assert len(data.val) == int(len(everything) * 0.1)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text \xff\xfe more text \xc3 end")
    messages: list[str] = []
    data = prepare_data([path], tmp_path / "cache", tokenizer=tokenizer, val_share=0.0, progress=False,
                        log=messages.append)
    assert data.meta["replaced_bytes"] == 3
    assert any("replaced 3 invalid UTF-8" in m for m in messages)
    assert tokenizer.decode(data.train).startswith("good text \ufffd\ufffd more text \ufffd end")


@pytest.mark.parametrize("case, message", [
    ("empty", "no text to train on"),
    ("binary", "looks like a binary file"),
    ("column", "no column 'text' (columns: id, body); choose it with --text-column"),
    ("field", "no field 'text'"),
    ("missing", "no such file or folder"),
])
def test_bad_data_gives_clear_errors(tmp_path, tokenizer, case, message):
    path = tmp_path / {"empty": "e.txt", "binary": "b.txt", "column": "c.csv", "field": "f.jsonl",
                       "missing": "nope.txt"}[case]
    if case == "empty":
        path.write_text("")
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif case == "column":
        path.write_text("id,body\n1,hello\n")
    elif case == "field":
        path.write_text('{"content": "hello"}\n')
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        prepare_data([path], tmp_path / "cache", tokenizer=tokenizer, progress=False)
    assert str(path) in str(info.value)


def test_cli_errors_are_one_line_exit_2(tmp_path, tiny_checkpoint):
    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    corpus = _corpus(tmp_path, repeats=3)
    runner = CliRunner()
    cases = [
        (["finetune", str(corpus), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o1"),
          "--block-size", "512"], "--block-size 512 exceeds the model's context (n_positions=128)"),
        (["train", str(corpus), "--config", TINY, "--out", str(tmp_path / "o2"), "--block-size", "64"],
         "fewer than one block of --block-size 64"),
        (["train", str(corpus), "--config", "n_layer=2,n_head=3,n_embd=32", "--out", str(tmp_path / "o3")],
         "n_embd (32) must be divisible by n_head (3)"),
        (["train", str(corpus), "--config", "gpt2-huge", "--out", str(tmp_path / "o4")], "unknown preset 'gpt2-huge'"),
        (["train", str(corpus), "--config", TINY, "--out", str(tmp_path / "o5"), "--epochs", "1", "--max-steps", "3"],
         "give --epochs or --max-steps, not both"),
        (["finetune", str(corpus), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o6"),
          "--lora-rank", "2", "--lora-targets", "q_proj"], "LoRA targets must be"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--no-progress"])
        assert result.exit_code == 2, (args, result.output)
        err = result.stderr if hasattr(result, "stderr") else result.output
        assert "gpt2lab: error: " in err and message in err, err
        assert "Traceback" not in err


# -- pieces of the loop ----------------------------------------------------------------------------------
def test_data_order_is_a_pure_function_of_seed_and_index():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = BlockSampler(tokens, 16, seed=3), BlockSampler(tokens, 16, seed=3)
    first = a.batch(0, 200)  # several epochs
    assert torch.equal(b.batch(150, 50), first[150:])  # jumping straight to a position: no replay
    assert torch.equal(first[:, 1:], first[:, :-1] + 1)  # contiguous blocks with their targets
    epoch0 = first[:a.n_blocks, 0]
    assert len(set(epoch0.tolist())) == a.n_blocks  # each block once per epoch
    assert not torch.equal(BlockSampler(tokens, 16, seed=4).batch(0, 200), first)


def test_schedule_and_weight_decay_groups():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_at(55, 1.0, 10, 100, 0.1) < 1.0
    from gpt2lab.model import GPT2, GPT2Config

    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and (len(decay["params"]), len(no_decay["params"])) == (6, 10)


# -- learning ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetune_drives_val_loss_down_and_learns_the_pattern(tmp_path, tiny_checkpoint):
    import gpt2lab

    corpus = _corpus(tmp_path, repeats=60)
    out = tmp_path / "out"
    result = train(TrainConfig(data=[str(corpus)], out=str(out), model=str(tiny_checkpoint), max_steps=40,
                               batch_size=4, block_size=32, lr=5e-3, dropout=0.0, eval_every=20, log_every=5,
                               progress=False, save_dtype="float16"))
    records = _metrics(out)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    print("validation loss:", vals)
    assert vals[0] > 8 and vals[-1] < 0.2 * vals[0]
    assert result.best_val_loss == pytest.approx(min(vals[1:]), abs=1e-5) and result.steps == 40
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert load_file(str(out / "model.safetensors"))["transformer.wte.weight"].dtype == torch.float16
    # the output folder is a plain checkpoint: gpt2lab and transformers both load it
    gen = gpt2lab.load(out)
    ids = gen.tokenizer.encode("the quick brown")
    for _ in range(5):  # greedy continuation
        ids.append(int(gen.logits(ids)[-1].argmax()))
    text = gen.tokenizer.decode(ids)
    print(repr(text))
    assert text == "the quick brown fox jumps over the lazy"
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(torch.tensor([ids])).logits[0].float(), gen.logits(ids), atol=1e-3)


def test_max_time_stops_cleanly_with_a_checkpoint(tmp_path):
    corpus = _corpus(tmp_path, repeats=40)
    out = tmp_path / "out"
    result = train(TrainConfig(data=[str(corpus)], out=str(out), config=TINY, max_steps=10_000, batch_size=2,
                               block_size=16, max_time=1e-6, progress=False, plot=False))
    assert result.stopped == "max_time" and result.steps == 1
    state = torch.load(CheckpointDir(out / "trainer").latest() / "state.pt", weights_only=False)
    assert state["step"] == 1
    assert load_model(out).config.n_embd == 32  # the model at the top level is complete


# -- exact resume after SIGKILL ---------------------------------------------------------------------------
def _train_cmd(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpt2lab", "train", str(corpus), "--config", TINY + ",dropout=0.1", "--out",
            str(out), "--max-steps", "16", "--batch-size", "4", "--block-size", "32", "--lr", "2e-3",
            "--eval-every", "8", "--save-every", "4", "--log-every", "1", "--seed", "7", "--threads", "1",
            "--no-progress", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    corpus = _corpus(tmp_path, repeats=60)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(corpus, ref), check=True, env=_env(), capture_output=True, timeout=300)
    # settle: somewhere after the first checkpoint, mid-step or mid-save
    sigkill_after_first_checkpoint(_train_cmd(corpus, killed), _env(), killed / "trainer", timeout=240,
                                   settle=0.3)
    saved = torch.load(CheckpointDir(killed / "trainer").latest() / "state.pt", weights_only=False)["step"]
    assert 4 <= saved < 16
    subprocess.run(_train_cmd(corpus, killed, "--resume"), check=True, env=_env(), capture_output=True, timeout=300)
    for sub in ("trainer", "."):
        a = load_file(str(ref / sub / "model.safetensors") if sub == "." else
                      str(CheckpointDir(ref / sub).latest() / "model" / "model.safetensors"))
        b = load_file(str(killed / sub / "model.safetensors") if sub == "." else
                      str(CheckpointDir(killed / sub).latest() / "model" / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}: {k} differs"
    # the metrics log reads as one run: every step once, the same losses
    def curve(out: Path) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(out)]

    assert curve(ref) == curve(killed)
    print(f"killed after checkpoint at step {saved}; resumed weights equal the uninterrupted run")


# -- DDP ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    corpus = _corpus(tmp_path, repeats=60)
    common = ["--config", TINY, "--max-steps", "8", "--block-size", "32", "--lr", "5e-3", "--dropout", "0",
              "--log-every", "1", "--eval-every", "8", "--seed", "1", "--threads", "1", "--no-progress",
              "--grad-accum", "2"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "gpt2lab", "train", str(corpus), "--out", str(single),
                    "--batch-size", "4", *common], check=True, env=_env(), capture_output=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run([*torchrun, "-m", "gpt2lab", "train", str(corpus), "--out", str(ddp), "--batch-size", "2",
                          *common], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one = [r["loss"] for r in _metrics(single) if "loss" in r]
    two = [r["loss"] for r in _metrics(ddp) if "loss" in r]
    print("1 process :", one)
    print("2 processes:", two)
    assert len(one) == len(two) == 8
    assert one[-1] < one[0] - 0.5  # it learned something
    assert np.allclose(one, two, rtol=1e-4, atol=1e-4)
    val_one = [r["val_loss"] for r in _metrics(single) if "val_loss" in r]
    val_two = [r["val_loss"] for r in _metrics(ddp) if "val_loss" in r]
    assert np.allclose(val_one, val_two, rtol=1e-4, atol=1e-4)
    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# -- LoRA ---------------------------------------------------------------------------------------------------
def test_lora_merge_leaves_the_global_rng_alone():
    # a merge runs at every checkpoint and publish of a LoRA run, after the checkpoint recorded the RNG
    # state: drawing from the global RNG there shifted the dropout stream, so a resumed run diverged
    from gpt2lab.training.lora import apply_lora, merge_lora

    model = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    apply_lora(model, 2, 4.0, "c_attn,mlp.c_proj")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the adapters an update to merge
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        before = model.eval()(ids)
    state = torch.get_rng_state()
    merged = merge_lora(model)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        assert torch.allclose(merged(ids), before, atol=1e-5)


@pytest.mark.slow
def test_lora_trains_only_adapters_and_merges_exactly(tmp_path):
    from gpt2lab.training.lora import load_adapter

    base = make_hf_checkpoint(tmp_path / "base", seed=2, n_layer=2, n_head=2, n_embd=32, n_positions=64)
    corpus = _corpus(tmp_path, repeats=40)
    out = tmp_path / "out"
    train(TrainConfig(data=[str(corpus)], out=str(out), model=str(base), max_steps=12, batch_size=4, block_size=32,
                      lora_rank=4, lora_targets="c_attn,mlp.c_proj", eval_every=6, progress=False, plot=False))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # peft's names (base_model.model.transformer.<module>.lora_A.weight), so peft loads it
    assert set(adapter) == {f"base_model.model.transformer.h.{i}.{m}.lora_{ab}.weight" for i in range(2)
                            for m in ("attn.c_attn", "mlp.c_proj") for ab in "AB"}
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    # the base weights never moved: the checkpoint's adapter on the original base gives the merged model
    original = load_model(base)
    adapted = load_adapter(load_model(base), out / "adapter").eval()
    for name, p in original.named_parameters():
        wrapped = name.replace("c_attn.", "c_attn.base.").replace("mlp.c_proj.", "mlp.c_proj.base.")
        assert torch.equal(p, adapted.get_parameter(wrapped)), name
    merged = load_model(out)
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(ids) - adapted(ids)).abs().max().item()
        moved = (merged(ids) - original(ids)).abs().max().item()
    assert diff < 1e-4 and moved > 1e-3
    # peft loads the run's adapter onto the transformers base with the merged model's logits
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), out / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(ids).logits - merged(ids)).abs().max().item() < 1e-4
    card = (out / "README.md").read_text()
    assert "LoRA adapter (rank 4" in card and "merged into the base weights" in card


def test_best_model_and_early_stopping(tmp_path):
    from gpt2lab.training import Trainer
    from gpt2lab.training.records import ProgressBar

    corpus = _corpus(tmp_path, repeats=20)
    trainer = Trainer(TrainConfig(data=[str(corpus)], out=str(tmp_path / "out"), config=TINY, block_size=16,
                                  patience=2, progress=False, plot=False))
    bar = ProgressBar(False, 10, 0)
    weights = tmp_path / "out" / "model.safetensors"
    assert trainer._record_eval(5.0, None, bar, save_best=True) is False and weights.is_file()
    published = weights.stat().st_mtime_ns
    assert trainer._record_eval(4.0, None, bar, save_best=True) is False and trainer.best_val == 4.0
    assert weights.stat().st_mtime_ns >= published
    assert trainer._record_eval(4.5, None, bar, save_best=True) is False  # 1 without improvement
    assert trainer._record_eval(4.2, None, bar, save_best=True) is True  # 2: patience exhausted
    assert trainer.best_val == 4.0


def test_lora_lives_in_model_and_checkpoints_and_training_re_exports_it():
    # generation loads adapters: LoRA's module swap is the model's, its files the checkpoints', so nothing below
    # training imports training (it imports generation); gpt2lab.training.lora keeps the documented names
    import grimp

    import gpt2lab.checkpoints.adapters as files
    import gpt2lab.model.lora as swap
    import gpt2lab.training.lora as documented

    for name in documented.__all__:
        owner = swap if hasattr(swap, name) else files
        assert getattr(documented, name) is getattr(owner, name), name
    graph = grimp.build_graph("gpt2lab")
    for lower in ("gpt2lab.generation", "gpt2lab.checkpoints", "gpt2lab.model"):
        assert not graph.chain_exists(importer=lower, imported="gpt2lab.training", as_packages=True), lower
