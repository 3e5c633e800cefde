"""The options every command shares: backslash escapes, --device/--dtype/--threads/--quantization,
--version, shell completion, and an explicitly named model that cannot be had (no silent fallback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpt2lab.cli.options import build_runtime, process_escapes


def _run(*args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("raw, expected", [
    (r"\n\n", "\n\n"), (r"a\tb\rc", "a\tb\rc"), (r"\\n", "\\n"), (r"say \"hi\" \'x\'", "say \"hi\" 'x'"),
    (r"\x41\x42", "AB"), (r"\xc3\xa9", "é"), (r"\u00e9\u2603", "é☃"),
    # not escapes: kept as written (llama.cpp keeps unknown escapes too)
    (r"C:\path\file", r"C:\path\file"), ("end\\", "end\\"), (r"\x4", r"\x4"), (r"\xzz", r"\xzz"), (r"\u12", r"\u12"),
    ("plain", "plain"), ("", ""),
])
def test_process_escapes(raw, expected):
    assert process_escapes(raw) == expected


def test_runtime_options_are_checked():
    assert build_runtime("CUDA:1", "bf16", "INT8", 2).load_kwargs() == {"device": "cuda:1", "dtype": "bf16",
                                                                       "quantization": "int8"}
    assert build_runtime("auto", "auto", None, None).load_kwargs() == {"device": "auto", "dtype": "auto"}
    assert build_runtime("auto", None, None, None).load_kwargs() == {"device": "auto", "dtype": None}  # the default
    assert build_runtime("cpu", "auto", "none", None).load_kwargs()["quantization"] is None
    assert build_runtime("cpu", None, None, "AUTO").threads == "auto"
    assert build_runtime("cpu", None, None, "3").threads == 3
    for args, message in [(("cpu", None, None, "many"), "--threads must be auto or an integer"),
                          (("gpu", "auto", None, None), "--device"), (("cpu", "int4", None, None), "--dtype"),
                          (("cpu", "auto", "int2", None), "--quantization"), (("cpu", "auto", None, 0), "--threads")]:
        with pytest.raises(ValueError, match=message):
            build_runtime(*args)


@pytest.mark.slow
def test_stop_and_bad_word_understand_escapes():
    """The docs' own example: --stop "\\n" stops at a newline (without the escape it never did)."""
    common = ["generate", "To be, or not to be", "--model", "shakespeare-gpt2", "--temperature", "0",
              "--max-new-tokens", "40", "--json", "--threads", "1"]
    free = json.loads(_run(*common).stdout)
    assert "\n" in free["text"], "the bundled model writes verse: greedy text has line breaks"
    stopped = json.loads(_run(*common, "--stop", r"\n").stdout)
    assert stopped["finish_reason"] == "stop" and "\n" not in stopped["text"]
    assert free["text"].startswith(stopped["text"])
    banned = json.loads(_run(*common, "--bad-word", r"\n").stdout)
    assert "\n" not in banned["text"] and banned["finish_reason"] == "length"


def test_version_and_completion():
    from gpt2lab import __version__

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"gpt2lab {__version__}"
    r = _run("--show-completion", "bash", env_extra={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.returncode == 0 and "complete" in r.stdout and "gpt2lab" in r.stdout.lower()


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["generate", "hi", "--model", "gpt2"],
    ["serve", "--model", "gpt2", "--port", "0"],
    ["finetune", "README.md", "--model", "gpt2", "--out", "{tmp}/out"],
])
def test_explicit_model_never_falls_back(tmp_path, command):
    """``--model gpt2`` named explicitly, not downloadable: an error saying how to get it, not the bundled model."""
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    r = _run(*[a.replace("{tmp}", str(tmp_path)) for a in command], env_extra=empty_cache)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: error: model 'gpt2'"), r.stderr
    assert "hf download gpt2" in lines[0] and "shakespeare" not in r.stdout
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_implicit_default_still_falls_back(tmp_path):
    r = _run("info", "--json", env_extra={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "h")})
    assert r.returncode == 0 and json.loads(r.stdout)["model"] == "shakespeare-gpt2"
    assert "using the bundled model" in r.stderr


@pytest.mark.slow
def test_device_and_dtype_reach_the_model(tiny_checkpoint):
    r = _run("info", "--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "bfloat16", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert (record["device"], record["dtype"]) == ("cpu", "bfloat16")
    r = _run("generate", "hi", "--model", str(tiny_checkpoint), "--dtype", "bfloat16", "--max-new-tokens", "4",
             "--threads", "1", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["token_ids"]) == 4, r.stderr


def _invoke(*args: str):
    """The command in this process (typer's runner): for errors raised before any model loads."""
    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--device", "gpu"], "--device must be"),
    (["story", "x", "--dtype", "int4", "--out", "{tmp}/stories"], "--dtype must be"),
    (["chat", "--message", "hi", "--threads", "0"], "--threads must be"),
    (["generate", "hi", "--threads", "100000"], "--threads must be auto or an integer in [1, 1024]"),  # was a SIGSEGV
    (["train", "README.md", "--config", "gpt2-tiny", "--out", "{tmp}/x", "--threads", "100000"], "--threads must be"),
    (["eval", "perplexity", "README.md", "--quantization", "int2"],
     "--quantization must be one of none, int8, bf16, int4"),
    (["train", "README.md", "--config", "gpt2-tiny", "--out", "{tmp}/x", "--dtype", "fp8"], "--dtype must be"),
])
def test_bad_runtime_values_exit_2(tmp_path, args, message):
    r = _invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == 2 and r.stderr.startswith(f"gpt2lab: error: {message}"), r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("command", [["info"], ["serve"], ["eval", "perplexity", "README.md"], ["explore", "x",
                                                                                              "--out", "{tmp}/o"]])
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, command):
    r = _invoke(*[a.replace("{tmp}", str(tmp_path)) for a in command], "--device", "cuda")
    assert r.exit_code == 2 and "no CUDA GPU is available" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_prompt_arguments_of_every_generating_command_understand_escapes(tiny_checkpoint, tmp_path):
    """`explore` and `review make` took their prompt arguments literally ('A\\tB' stayed 5 characters) while
    `generate` turned escapes into characters: the README promises it for prompt arguments in every command."""
    model = str(tiny_checkpoint)
    r = _invoke("review", "make", r"A\tB", "-m", model, "--setting", "temperature=0", "--setting", "temperature=1",
                "--max-new-tokens", "2", "-o", str(tmp_path / "r.jsonl"))
    assert r.exit_code == 0, r.output
    from gpt2lab.review import read_review_set

    assert {it.prompt for it in read_review_set(tmp_path / "r.jsonl").items} == {"A\tB"}
    r = _invoke("explore", r"A\tB", "--model", model, "-t", "1.0", "-k", "0", "-p", "1.0", "--max-length", "6",
                "--samples", "1", "--out", str(tmp_path / "ex"))
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "ex" / "results.json").read_text(encoding="utf-8"))
    assert {x["prompt"] for s in results["settings"] for x in s["samples"]} == {"A\tB"}


@pytest.mark.slow
def test_a_half_precision_checkpoint_loads_as_the_library_loads_it():
    """The bundled model is stored in float16. Without --dtype a command loads it as gpt2lab.load() does,
    float32 on a CPU, which gpt2lab's kernels run (it used to stay float16: PyTorch's code, 2-3x slower in
    batches and not batch invariant); --dtype auto keeps float16; info shows the quantization."""
    def info(*args: str) -> tuple[str, str | None]:
        r = _run("info", "--model", "shakespeare-gpt2", "--device", "cpu", "--json", *args)
        assert r.returncode == 0, r.stderr
        record = json.loads(r.stdout)
        return record["dtype"], record["quantization"]

    assert info() == ("float32", None)
    assert info("--dtype", "auto") == ("float16", None)
    assert info("--quantization", "int8") == ("float32", "int8")  # it said bfloat16: the embedding's dtype
