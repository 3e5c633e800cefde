"""Generation speed on CPU: gpt2lab (fp32, int8, int4) against transformers, CTranslate2 and llama.cpp (issues 18, 27).

    PYTHONPATH=src python benchmarks/generate.py                       # everything available, a few minutes
    PYTHONPATH=src python benchmarks/generate.py --contenders gpt2lab gpt2lab-int8 ct2 ct2-int8 --batches 1
    PYTHONPATH=src python benchmarks/generate.py --models 124m --repeats 5 --threads 2
    PYTHONPATH=src python benchmarks/generate.py --models 124m --contenders gpt2lab gpt2lab-int8 \\
        --thread-counts auto 1 2 --contention 1        # auto threads against fixed counts, one core busy
    PYTHONPATH=src python benchmarks/generate.py --models 124m --batches 1 --repeats 5 \\
        --contenders gpt2lab-int8 gpt2lab-int4 llama-q8 llama-q4_0 llama-q4_k_m   # issue 27's int4 bars

Models: randomly initialised GPT-2 124M and a GPT-2 medium-shaped 355M (``transformers.GPT2Config``
defaults / 24 layers x 1024), saved by transformers in Hugging Face layout under
``~/.cache/gpt2lab/bench/`` on first use. Every contender samples ``--new-tokens`` tokens with top_k=50 at
temperature 1 (top_p, min_p and every penalty off) from 16-token prompts (EOS ignored, so every row makes them
all), fp32 activations (the int8 formats of CTranslate2 and llama.cpp quantize them on the fly for their integer
products, as they always do), ``--threads`` threads. Only generation is timed (prefill and decode, not loading).
Runs alternate between the contenders (a burst of load elsewhere hits all alike); best and median count.

Contenders (each skipped with a note when its package is missing):
- ``gpt2lab``, ``gpt2lab-int8``, ``gpt2lab-bf16``: ``gpt2lab.load(dir[, quantization=...])`` then ``generate``;
  ``gpt2lab-int8-head``: int8 with the LM head in int8 too (``quantize_(model, "int8", lm_head="int8")``)
  (no other call: this is what every user gets); ``gpt2lab-int4``: 4-bit block weights (bf16 head, as int8),
  ``gpt2lab-int4-head``: with the LM head in int8;
- ``transformers``: ``GPT2LMHeadModel.generate`` (124M only: it is the slow reference);
- ``ct2``, ``ct2-int8``: CTranslate2 ``float32`` / ``int8_float32`` (``pip install ctranslate2``), converted with
  ``TransformersConverter``, ``Generator.generate_batch(..., sampling_topk=50)``;
- ``llama-f32``, ``llama-q8``: llama.cpp through ``llama-cpp-python`` at batch 1 (``Llama.generate``, fp32 KV cache,
  an empty context for each run), on GGUF files made by llama.cpp's ``convert_hf_to_gguf.py`` (``--outtype f32`` /
  ``q8_0``): read from ``--gguf-dir DIR`` (default: next to the checkpoints) as ``<model>-f32.gguf`` and
  ``<model>-q8_0.gguf`` (e.g. ``gpt2-124m-random-q8_0.gguf``), or converted there once with ``--convert-script
  PATH`` (default: ``convert_hf_to_gguf.py`` on PATH); ``llama-q4_0``, ``llama-q4_k_m``: llama.cpp's Q4_0 (blocks
  of 32, one fp16 scale) and Q4_K_M (super-blocks of 256, 6-bit sub-scales, some tensors in Q6_K) made from the
  f32 GGUF by ``llama_cpp.llama_model_quantize`` as ``<model>-q4_0.gguf`` / ``<model>-q4_k_m.gguf``. The
  converter and llama-cpp-python come in llama-cpp-python's source distribution;
  the build takes about 10 minutes on 2 cores, and the converter also needs ``pip install mistral-common``::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.16 -d /tmp/lcp
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install /tmp/lcp/llama_cpp_python-0.3.16.tar.gz
    tar xzf /tmp/lcp/llama_cpp_python-0.3.16.tar.gz -C /tmp/lcp
    PYTHONPATH=src python benchmarks/generate.py \\
        --convert-script /tmp/lcp/llama_cpp_python-0.3.16/vendor/llama.cpp/convert_hf_to_gguf.py

Printed per model and batch: tokens/s best (median) per contender, the ratios the issue's bars name (each
with its bar, met or MISSED), and at batch 1 the fraction of the memory-bandwidth limit reached (a decode step
streams every weight once: the measured bandwidth divided by the bytes of weights per token, int8 and fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2lab" / "bench"
MODELS = {"124m": dict(), "355m": dict(n_embd=1024, n_layer=24, n_head=16)}
PROMPT_LEN, TOP_K = 16, 50
# common words that are one GPT-2 token each with a leading space: prompts of exactly PROMPT_LEN tokens
WORDS = ("the cat dog house river old new city light water people time year world day man woman child "
         "music story night road king book small great long green black white red field tree").split()
ALL = ("gpt2lab", "gpt2lab-int8", "gpt2lab-int8-head", "gpt2lab-int4", "gpt2lab-int4-head", "gpt2lab-bf16",
       "transformers", "ct2", "ct2-int8", "llama-f32", "llama-q8", "llama-q4_0", "llama-q4_k_m")
# what each llama.cpp contender's GGUF is: convert_hf_to_gguf.py's --outtype, or a llama_model_quantize file type
LLAMA_TYPES = {"llama-f32": "f32", "llama-q8": "q8_0", "llama-q4_0": "q4_0", "llama-q4_k_m": "q4_k_m"}
DEFAULT = ("gpt2lab", "gpt2lab-int8", "transformers", "ct2", "ct2-int8", "llama-f32", "llama-q8")


def ensure_checkpoint(name: str) -> Path:
    """The random checkpoint ``name`` (HF's own save_pretrained), created unless already there."""
    from gpt2lab.atomic import write_dir
    from gpt2lab.tokenizer import gpt2_tokenizer_dir

    directory = BENCH_DIR / f"gpt2-{name}-random"
    if (directory / "config.json").is_file():
        return directory
    from transformers import GPT2Config, GPT2LMHeadModel

    print(f"creating a random GPT-2 {name} checkpoint in {directory} ...", flush=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**MODELS[name])).eval()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for f in ("vocab.json", "merges.txt"):
            (tmp / f).write_bytes((gpt2_tokenizer_dir() / f).read_bytes())

    return write_dir(directory, fill)


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tokenizer.encode("The" + "".join(" " + rng.choice(WORDS) for _ in range(PROMPT_LEN - 1)))
        assert len(ids) == PROMPT_LEN
        out.append(ids)
    return out


# A plain read in C, the threads splitting it as the kernels split a product (torch.sum stops near 2/3 of what
# the memory delivers here: 50-53 GB/s against 77-88); huge pages, 4 independent sums per thread.
_READ_C = r"""
#include <stdint.h>
#include <immintrin.h>
float read_all(const float *a, int64_t n, int threads) {
    float total = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i += 32) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i)); s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
            s2 = _mm256_add_ps(s2, _mm256_loadu_ps(a + i + 16)); s3 = _mm256_add_ps(s3, _mm256_loadu_ps(a + i + 24));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        for (int j = 0; j < 8; j++) total += lanes[j];
    }
    return total;
}
"""


def memory_bandwidth_gbs(rounds: int = 8) -> float:
    """Read bandwidth now (GB/s): the best of ``rounds`` reads of 512 MB (far larger than any cache) on huge
    pages, in C with ``torch.get_num_threads()`` threads; ``torch.sum`` where no AVX2 C compiler is at hand."""
    import ctypes

    from gpt2lab.kernels import compiler as c_compiler
    from gpt2lab.runtime.huge_pages import huge_page_copy, huge_pages_available

    x = torch.ones(128 * 2**20)
    if huge_pages_available():
        x = huge_page_copy(x)
    read: Callable[[], object] = x.sum
    compiler = c_compiler()
    if compiler is not None:
        tmp = Path(tempfile.mkdtemp())
        try:
            (tmp / "read.c").write_text(_READ_C, encoding="utf-8")
            subprocess.run([compiler, "-O2", "-mavx2", "-fopenmp", "-shared", "-fPIC", str(tmp / "read.c"), "-o",
                            str(tmp / "read.so")], check=True, capture_output=True)
            lib = ctypes.CDLL(str(tmp / "read.so"))
            lib.read_all.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            lib.read_all.restype = ctypes.c_float
            threads = torch.get_num_threads()

            def read() -> float:
                return lib.read_all(x.data_ptr(), x.numel(), threads)
        except (subprocess.CalledProcessError, OSError):
            pass  # torch.sum it is
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    read()
    best = min(_timed(read) for _ in range(rounds))
    return x.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- contenders: each returns run(prompts, new_tokens) -> token ids per prompt, or raises SkipContender -----
class SkipContender(Exception):
    """A contender that cannot run here (its package or files are missing)."""


def gpt2lab_runner(directory: Path, quantization: str | None):
    import gpt2lab

    if quantization is not None and quantization.endswith("-head"):  # the LM head in int8 (by default bf16)
        from gpt2lab.model.quantize import quantize_

        gen = gpt2lab.load(directory)
        quantize_(gen.model, quantization.removesuffix("-head"), lm_head="int8")
    else:
        gen = gpt2lab.load(directory, quantization=quantization)

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        texts = [gen.tokenizer.decode(p) for p in prompts]
        outs = gen.generate(texts, max_new_tokens=new, top_k=TOP_K, temperature=1.0, ignore_eos=True, seed=1234)
        return [o.token_ids for o in outs]

    run.weight_bytes = sum(t.numel() * t.element_size() for n, t in gen.model.state_dict(keep_vars=True).items()
                           if "wpe" not in n) if quantization is None else _quantized_bytes(gen.model)
    return run


def _quantized_bytes(model) -> int:  # noqa: ANN001
    """Bytes a decode step streams: the quantized weights and scales, plus the float parameters."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wpe" not in n)
    return total + sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".kv_cache." not in n)


def transformers_runner(directory: Path):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(directory).float().eval()

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=True, top_k=TOP_K, temperature=1.0, pad_token_id=hf.config.eos_token_id)
        return out[:, ids.shape[1]:].tolist()

    return run


def ct2_runner(directory: Path, compute_type: str, threads: int):
    try:
        import ctranslate2
    except ImportError as exc:
        raise SkipContender("ctranslate2 is not installed (pip install ctranslate2)") from exc
    from gpt2lab.tokenizer import Tokenizer

    quant = "int8" if compute_type.startswith("int8") else None
    out_dir = BENCH_DIR / f"{directory.name}-ct2-{quant or 'float32'}"
    if not (out_dir / "model.bin").is_file():
        ctranslate2.converters.TransformersConverter(str(directory)).convert(str(out_dir), quantization=quant,
                                                                             force=True)
    gen = ctranslate2.Generator(str(out_dir), device="cpu", compute_type=compute_type, intra_threads=threads)
    tok = Tokenizer.from_dir(directory)

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        start = [[tok.id_to_token(i) for i in p] for p in prompts]
        res = gen.generate_batch(start, max_length=new, min_length=new, sampling_topk=TOP_K, sampling_temperature=1.0,
                                 include_prompt_in_result=False, return_scores=False)
        return [r.sequences_ids[0] for r in res]

    return run


def convert_to_gguf(directory: Path, outtype: str, script: Path, out: Path) -> None:
    """Write ``out``, the HF GPT-2 folder ``directory`` in GGUF ``outtype`` (``f32``, ``q8_0``), with llama.cpp's
    ``convert_hf_to_gguf.py`` at ``script`` (it needs ``transformers``, ``torch`` and ``mistral-common``).

    The converter reads GPT-2's context length from ``config.json``'s ``n_ctx``, which transformers 5 no longer
    writes (it keeps ``n_positions``): it runs on a staging folder of links to the checkpoint's files with a
    config that has ``n_ctx`` added; the checkpoint is never touched. ``out`` appears only once complete.
    Raises SkipContender naming the converter's last error line if it fails.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        staged = Path(tmp) / "hf"
        staged.mkdir()
        for f in directory.iterdir():
            if f.is_file() and f.name != "config.json":
                (staged / f.name).symlink_to(f.resolve())
        config = json.loads((directory / "config.json").read_text())
        config.setdefault("n_ctx", config["n_positions"])
        (staged / "config.json").write_text(json.dumps(config, indent=2))
        print(f"converting {directory.name} to {out} with {script} ...", flush=True)
        done = subprocess.run([sys.executable, str(script), str(staged), "--outtype", outtype,
                               "--outfile", str(Path(tmp) / out.name)], capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise SkipContender(f"{script.name} failed (exit {done.returncode}): {lines[-1]}")
        os.replace(Path(tmp) / out.name, out)


def quantize_gguf(source: Path, out: Path, ftype: str, threads: int) -> None:
    """Write ``out``, the f32 GGUF ``source`` quantized by llama.cpp's ``llama_model_quantize`` to ``ftype``
    (``q4_0``, ``q4_k_m``: llama.cpp's own choice of type per tensor, as its ``llama-quantize`` tool makes them).
    ``out`` appears only once complete; SkipContender if llama.cpp fails."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[ftype]
    params.nthread = threads
    tmp = out.with_name(f".{out.name}.tmp")
    print(f"quantizing {source.name} to {out.name} with llama_model_quantize ...", flush=True)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        tmp.unlink(missing_ok=True)
        raise SkipContender(f"llama_model_quantize could not make {out.name}")
    os.replace(tmp, out)


def llama_runner(directory: Path, outtype: str, threads: int, gguf_dir: Path | None, convert: Path | None):
    try:
        import llama_cpp
    except ImportError as exc:
        raise SkipContender("llama-cpp-python is not installed (a source build: see docs/performance.md)") from exc
    folder = gguf_dir or BENCH_DIR
    gguf = folder / f"{directory.name}-{outtype}.gguf"
    if not gguf.is_file():
        source = folder / f"{directory.name}-f32.gguf" if outtype.startswith("q4") else gguf
        if not source.is_file():
            if convert is None:
                raise SkipContender(f"no {source} (give --gguf-dir, or --convert-script: llama.cpp's "
                                    f"convert_hf_to_gguf.py)")
            convert_to_gguf(directory, "f32" if source != gguf else outtype, convert, source)
        if source != gguf:
            quantize_gguf(source, gguf, outtype, threads)
    # fp32 KV cache like the others (llama.cpp's default is f16); the 16-token prompt is one decode call
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, seed=1234, verbose=False)

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        assert len(prompts) == 1, "llama.cpp runs at batch 1 here"
        # an empty context: generate() would otherwise reuse the KV cache of the same prompt's previous run
        llm.reset()
        out = []
        # the others' settings: top-k 50 at temperature 1 and every other filter and penalty off (min_p's
        # default is 0.05); generate() never stops at EOS, so it yields exactly `new` tokens
        for token in llm.generate(prompts[0], top_k=TOP_K, top_p=1.0, min_p=0.0, typical_p=1.0, temp=1.0,
                                  repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, reset=True):
            out.append(token)
            if len(out) == new:
                break
        return [out]

    return run


def build(name: str, directory: Path, args) -> Callable:  # noqa: ANN001
    name = name.split("@")[0]  # gpt2lab's thread count, applied in _contender_process
    if name == "gpt2lab":
        return gpt2lab_runner(directory, None)
    if name.startswith("gpt2lab-"):
        return gpt2lab_runner(directory, name.split("-", 1)[1])
    if name == "transformers":
        return transformers_runner(directory)
    if name in ("ct2", "ct2-int8"):
        return ct2_runner(directory, "int8_float32" if name == "ct2-int8" else "float32", args.threads)
    return llama_runner(directory, LLAMA_TYPES[name], args.threads, args.gguf_dir, args.convert_script)


COOL_DOWN_S = 0.5


class Isolated:
    """A contender in a process of its own, driven over a pipe: ``timed(prompts, new)`` runs it there and
    returns (seconds, token ids). In one shared process the libraries slow each other down: CTranslate2
    brings its own libgomp, whose threads keep a core busy, and gpt2lab int8 ran at 74 tok/s there against
    108 beside llama.cpp alone (llama.cpp q8_0 likewise 73 against 123). Raises SkipContender as build does.
    """

    def __init__(self, name: str, directory: Path, args: argparse.Namespace) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_contender_process, args=(name, directory, args, child), daemon=True)
        self.process.start()
        status, value = self.conn.recv()
        if status != "ok":
            self.close()
            raise SkipContender(value) if status == "skip" else RuntimeError(f"{name}: {value}")
        self.weight_bytes = value

    def timed(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        self.conn.send((prompts, new))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(10)


def _contender_process(name: str, directory: Path, args: argparse.Namespace, conn) -> None:  # noqa: ANN001
    torch.set_num_threads(args.threads)
    if "@" in name:  # gpt2lab@auto, gpt2lab-int8@1: the kernels' thread policy (auto, or a pinned count)
        from gpt2lab.runtime import set_threads

        count = name.split("@")[1]
        set_threads(count if count == "auto" else int(count))
    try:
        run = build(name, directory, args)
    except SkipContender as exc:
        conn.send(("skip", str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", getattr(run, "weight_bytes", None)))
    while (job := conn.recv()) is not None:
        try:
            start = time.perf_counter()
            ids = run(*job)
            conn.send(("ok", (time.perf_counter() - start, ids)))
        except Exception as exc:  # noqa: BLE001
            conn.send(("error", f"{name}: {type(exc).__name__}: {exc}"))


def _busy(deadline: float) -> None:
    """A busy loop until ``deadline`` (time.monotonic()): another process keeping a core busy."""
    while time.monotonic() < deadline:
        pass


@contextlib.contextmanager
def contention(n: int, limit_s: float = 900.0):
    """``n`` processes each spinning on a core while the block runs (stopped after it, and after
    ``limit_s`` at most even if this process dies)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_busy, args=(time.monotonic() + limit_s,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join(10)


def measure(runners: dict[str, Isolated], prompts: list[list[int]], new: int, repeats: int) -> dict:
    """tokens/s (best, median) per contender, runs alternating, each in its own process."""
    for name, run in runners.items():  # warm-up: allocations, kernels, primitives; and a length check
        _, got = run.timed(prompts, 8)
        assert all(len(t) == 8 for t in got), f"{name} made {[len(t) for t in got]} tokens, not 8"
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            time.sleep(COOL_DOWN_S)  # the previous contender's worker threads stop spinning first
            times[name].append(run.timed(prompts, new)[0])
    tokens = len(prompts) * new
    return {k: (tokens / min(v), tokens / statistics.median(v)) for k, v in times.items()}


# issue 18's and 27's bars: (numerator, denominator, batch) -> (at least, goal or None); where both set one for
# the same pair, issue 27's (the later, on the AVX-512 machine)
BARS = {("gpt2lab-int8", "llama-q8", 1): (1.2, None), ("gpt2lab-int8", "ct2-int8", 1): (1.5, None),
        ("gpt2lab-int8", "ct2-int8", 8): (1.5, None), ("gpt2lab", "llama-f32", 1): (1.0, None),
        ("gpt2lab", "ct2", 1): (1.0, None), ("gpt2lab", "ct2", 8): (1.2, None),
        ("gpt2lab-int4", "llama-q4_0", 1): (1.2, None), ("gpt2lab-int4", "gpt2lab-int8", 1): (1.5, None)}
RATIOS = (("gpt2lab-int8", "llama-q8"), ("gpt2lab-int8", "ct2-int8"), ("gpt2lab-int8-head", "llama-q8"),
          ("gpt2lab-int8-head", "ct2-int8"), ("gpt2lab", "llama-f32"), ("gpt2lab", "ct2"),
          ("gpt2lab", "transformers"), ("gpt2lab-int8", "gpt2lab"), ("gpt2lab-int4", "llama-q4_0"),
          ("gpt2lab-int4", "llama-q4_k_m"), ("gpt2lab-int4", "gpt2lab-int8"), ("gpt2lab-int4-head", "llama-q4_0"),
          ("gpt2lab-int4-head", "gpt2lab-int8-head"), ("gpt2lab-int4-head", "gpt2lab-int8"))


def _ratio(rates: dict, a: str, b: str, batch: int) -> str | None:
    """``a``'s best tokens/s over ``b``'s, with the issue's bar for it at this batch size if it has one."""
    if a not in rates or b not in rates:
        return None
    ratio = rates[a][0] / rates[b][0]
    line = f"  {a + ' / ' + b:28s} {ratio:5.2f}x"
    if (a, b, batch) in BARS:
        bar, goal = BARS[a, b, batch]
        verdict = "met" if ratio >= bar else "MISSED"
        line += f"  (bar {bar:.2f}x: {verdict}" + (f"; goal {goal:.2f}x" if goal else "") + ")"
    return line


def _auto_ratios(rates: dict) -> list[str]:
    """Each ``X@auto`` against the best fixed count ``X@N`` of the same run (bar: at least 0.95x)."""
    lines = []
    for name in rates:
        base, _, count = name.partition("@")
        fixed = {n: r for n, r in rates.items() if n.startswith(base + "@") and n.split("@")[1].isdigit()}
        if count == "auto" and fixed:
            best = max(fixed, key=lambda n: fixed[n][0])
            ratio = rates[name][0] / fixed[best][0]
            verdict = "met" if ratio >= 0.95 else "MISSED"
            lines.append(f"  {name + ' / ' + best:28s} {ratio:5.2f}x  (bar 0.95x: {verdict})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--contenders", nargs="+", default=list(DEFAULT), metavar="NAME",
                    help=f"which to time (default: {' '.join(DEFAULT)}; choices: {' '.join(ALL)}; a gpt2lab "
                         "contender may name its thread count: gpt2lab@auto, gpt2lab-int8@1)")
    ap.add_argument("--thread-counts", nargs="+", metavar="N", default=None,
                    help="time each gpt2lab contender at each of these thread counts (auto, 1, 2, ...) as "
                         "gpt2lab@auto, gpt2lab@1, ...; the report adds auto / best fixed count")
    ap.add_argument("--contention", type=int, default=0, metavar="N",
                    help="N other processes keep a core busy each during the timed runs (a shared machine)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes for the 124M model")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per contender (best and median count)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf-dir", type=Path, help="folder with <model>-f32.gguf / <model>-q8_0.gguf for llama.cpp "
                                                  f"(default: {BENCH_DIR})")
    found = shutil.which("convert_hf_to_gguf.py")
    ap.add_argument("--convert-script", type=Path, default=found and Path(found),
                    help="llama.cpp's convert_hf_to_gguf.py, to write missing GGUF files into the GGUF folder once "
                         "(default: the one on PATH, if any)")
    args = ap.parse_args()
    if args.thread_counts:
        args.contenders = [f"{n}@{c}" if n.startswith("gpt2lab") else n for n in args.contenders
                           for c in (args.thread_counts if n.startswith("gpt2lab") else [None])]
    for name in args.contenders:
        base, _, count = name.partition("@")
        if base not in ALL or (count and not (base.startswith("gpt2lab") and (count == "auto" or count.isdigit()))):
            ap.error(f"--contenders: {name!r} is not one of {' '.join(ALL)} (gpt2lab ones may end in @auto or @N)")

    torch.set_num_threads(args.threads)
    from gpt2lab import kernels

    kernels.library()
    print(f"torch {torch.__version__}, {args.threads} threads; gpt2lab's C kernels: "
          + (f"on ({kernels.isa()})" if kernels.available() else "OFF (PyTorch fallback)")
          + f"; load average {os.getloadavg()[0]:.1f}; {args.contention} busy processes during the timed runs")
    print(f"{PROMPT_LEN}-token prompts, {args.new_tokens} new tokens, top_k={TOP_K} sampling; tokens/s best of "
          f"{args.repeats} (median), runs alternating")
    bandwidth = memory_bandwidth_gbs()
    print(f"memory read bandwidth now: {bandwidth:.1f} GB/s")
    for model in args.models:
        directory = ensure_checkpoint(model)
        names = [n for n in args.contenders if not (model != "124m" and n == "transformers")]
        runners: dict[str, Isolated] = {}
        for name in names:
            try:
                runners[name] = Isolated(name, directory, args)
            except SkipContender as exc:
                print(f"  {model}: {name} skipped: {exc}")
        batches = args.batches if model == "124m" else [1]
        for batch in batches:
            active = {n: r for n, r in runners.items() if batch == 1 or not n.startswith("llama")}
            prompts = make_prompts(__import__("gpt2lab").tokenizer.Tokenizer.gpt2(), batch, seed=batch)
            with contention(args.contention):
                rates = measure(active, prompts, args.new_tokens, args.repeats)
            print(f"\nGPT-2 {model}, batch {batch}:")
            for name, (best, median) in rates.items():
                print(f"  {name:17s} {best:8.1f} ({median:6.1f}) tok/s")
            ratios = [line for a, b in RATIOS if (line := _ratio(rates, a, b, batch))] + _auto_ratios(rates)
            if ratios:
                print("  ratios of best tokens/s:\n" + "\n".join(ratios))
            if batch == 1:
                for name in [n for n in rates if n.startswith("gpt2lab")]:
                    if name in rates:
                        step = runners[name].weight_bytes
                        limit = bandwidth * 1e9 / step
                        print(f"  {name}: {step / 1e6:.0f} MB of weights per token -> bandwidth limit {limit:.0f} "
                              f"tok/s; reached {rates[name][0] / limit:.0%}")
        for run in runners.values():
            run.close()


if __name__ == "__main__":
    main()
