"""Shared fixtures: tiny randomly initialised GPT-2 checkpoints in Hugging Face layout, their Generator and
tokenizer, and the test servers with an ``openai`` client on them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from gpt2lab.tokenizer import gpt2_tokenizer_dir  # noqa: E402

from .server_helpers import server_fixture  # noqa: E402

torch.set_num_threads(2)

# Shapes exercised by the parity tests: tiny, distilgpt2-like depth, short context, odd vocabulary,
# non-default epsilon, untied head.
SHAPES = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128),
    "distil": dict(n_layer=6, n_head=4, n_embd=128, n_positions=1024),
    "oddvocab": dict(n_layer=3, n_head=4, n_embd=96, n_positions=256, vocab_size=1000, layer_norm_epsilon=1e-3),
    "wide": dict(n_layer=2, n_head=8, n_embd=256, n_positions=512, activation_function="gelu"),
}


def make_hf_checkpoint(directory: Path, *, seed: int = 0, safe: bool = True, with_tokenizer: bool = True,
                       **config_kwargs) -> Path:
    """Save a randomly initialised ``GPT2LMHeadModel`` with HF's own ``save_pretrained``."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**config_kwargs)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    if not safe:
        # transformers 5 writes safetensors only; write the .bin layout of the original GPT-2 uploads:
        # names without the "transformer." prefix, plus the causal-mask buffers older versions saved.
        from safetensors.torch import load_file

        state = load_file(directory / "model.safetensors")
        legacy = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        n = config.n_positions
        for i in range(config.n_layer):
            legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
            legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(legacy, directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
    if with_tokenizer and config.vocab_size == 50257:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(gpt2_tokenizer_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer 64-dim GPT-2 with the real GPT-2 vocabulary and tokenizer."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1, **SHAPES["tiny"])


@pytest.fixture()
def ckpt(tmp_path, tiny_checkpoint) -> Path:
    """A copy of ``tiny_checkpoint`` in this test's ``tmp_path``, for a test that damages its files."""
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    return out


def tiny_model(tmp_path_factory, name: str, *, seed: int, **shape) -> tuple[Path, object]:
    """A new tiny checkpoint (``SHAPES["tiny"]`` updated with ``shape``) in a fresh folder ``name``, and its
    Generator: ``(path, gpt2lab.load(path))``."""
    import gpt2lab

    path = make_hf_checkpoint(tmp_path_factory.mktemp(name), seed=seed, **{**SHAPES["tiny"], **shape})
    return path, gpt2lab.load(path)


def make_peft_adapter(directory: Path, base: Path, *, seed: int, rank: int = 4,
                      targets: tuple[str, ...] = ("c_attn", "c_fc"), scale_b: float = 3.0) -> Path:
    """A LoRA adapter of ``base`` made and saved by ``peft`` itself (``get_peft_model`` + ``save_pretrained``),
    with random ``B`` (peft's ``init_lora_weights=False``, times ``scale_b``) so that it changes what the model
    writes; ``alpha`` is ``2 * rank``."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), fan_in_fan_out=True, init_lora_weights=False,
        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale_b)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def lora_adapters(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    """Two peft-made adapters of ``tiny_checkpoint``: ``"ad-qkv"`` (rank 4 on c_attn and c_fc) and ``"ad-all"``
    (rank 8 on c_attn, both c_proj and c_fc)."""
    root = tmp_path_factory.mktemp("adapters")
    return {"ad-qkv": make_peft_adapter(root / "ad-qkv", tiny_checkpoint, seed=11),
            "ad-all": make_peft_adapter(root / "ad-all", tiny_checkpoint, seed=12, rank=8,
                                        targets=("c_attn", "c_proj", "c_fc"))}


@pytest.fixture(scope="module")
def gen(tiny_checkpoint):
    """``tiny_checkpoint`` loaded by :func:`gpt2lab.load`, once per test module."""
    import gpt2lab

    return gpt2lab.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokenizer():
    """GPT-2's tokenizer (:meth:`gpt2lab.tokenizer.Tokenizer.gpt2`), once per test module."""
    from gpt2lab.tokenizer import Tokenizer

    return Tokenizer.gpt2()


# -- servers (tests/server_helpers.py) ------------------------------------------------------------------
# ``server`` is the ``main`` test server; a module that tests another one names it with
# ``server = server_fixture("robust")``, and ``client`` and ``model`` then follow that one.
server = server_fixture("main")


@pytest.fixture(scope="module")
def client(server):
    """The real ``openai`` client on ``server``'s ``/v1`` (no retries: a failure shows at once)."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    """The model id ``server`` serves (its ``/v1/models``)."""
    return client.models.list().data[0].id


# -- devices ------------------------------------------------------------------------------------------
# Tests that take the ``device`` fixture run once per device: the CPU always (so they are real tests on
# every machine), CUDA where torch sees a GPU, and are skipped with the reason elsewhere.
_NO_CUDA = "no CUDA GPU here (torch.cuda.is_available() is False): the cuda case runs on a GPU machine"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device present: ``"cpu"``, then ``"cuda"`` (skipped with a reason where there is no GPU)."""
    return request.param


def sigkill_after_first_checkpoint(cmd: list[str], env: dict, trainer_dir: Path, *, timeout: float,
                                   settle: float = 0.0) -> None:
    """Run the training command ``cmd``, wait until it has written its first checkpoint under ``trainer_dir``
    (at most ``timeout`` seconds), wait ``settle`` seconds more, and SIGKILL it. Fails if it finished first."""
    import signal
    import subprocess
    import time

    from gpt2lab.training.checkpoint import CheckpointDir

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = CheckpointDir(trainer_dir)
    deadline = time.monotonic() + timeout
    while checkpoints.latest() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    time.sleep(settle)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# -- the checkout stays as it was: tests write under tmp_path, never into the working directory ----------------
_CHECKOUT = Path(__file__).resolve().parents[1]


def _checkout_entries() -> set[str]:
    return {name for name in os.listdir(_CHECKOUT) if not name.startswith(".") and name != "__pycache__"}


def pytest_sessionstart(session):
    session.config.stash[_entries_key] = _checkout_entries()


def pytest_sessionfinish(session, exitstatus):
    """A run left `o/` and `stories/` in the checkout (commands given a relative --out, or none): fail the
    session, naming what appeared."""
    new = sorted(_checkout_entries() - session.config.stash.get(_entries_key, set()))
    if new:
        session.config.get_terminal_writer().line(f"tests left {', '.join(new)} in {_CHECKOUT}: a test wrote into "
                                                  "the working directory instead of tmp_path", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_entries_key = pytest.StashKey[set]()
