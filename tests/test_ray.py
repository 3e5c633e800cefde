"""gpt2lab on a real local Ray cluster (2 CPUs, one per module): Ray Data batch jobs equal the one-process
commands row for row, a killed actor loses and duplicates nothing, Ray Serve replicas answer the openai client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.data")

from .server_helpers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module; its GCS address (``--ray ADDRESS`` joins it)."""
    import ray

    from gpt2lab.ray import connect

    os.environ["PYTHONPATH"] = str(ROOT / "src")  # the actors import this checkout's gpt2lab
    connect(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _gpt2lab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, env=_env(),
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


PROMPTS = ["Hello there", "The cat sat", "Once upon a time", "A", "Why is the sky", "日本語", "x", "To be"]


def test_generate_with_ray_writes_the_one_process_file(cluster, tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    common = ["generate", "--file", str(prompts), "--model", str(tiny_checkpoint), "--seed", "5",
              "--max-new-tokens", "6", "--n", "2", "--logprobs", "1"]
    _gpt2lab(*common, "--out", str(tmp_path / "one.jsonl"))
    _gpt2lab(*common, "--out", str(tmp_path / "ray.jsonl"), "--ray", cluster, "--actors", "2")
    one = (tmp_path / "one.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "ray.jsonl").read_text(encoding="utf-8") == one
    records = [json.loads(line) for line in one.splitlines()]
    assert [(r["prompt"], r["index"]) for r in records] == [(p, i) for p in PROMPTS for i in range(2)]
    assert all(len(r["token_ids"]) == 6 and len(r["logprobs"]) == 6 for r in records)
    # the one rule: prompt k is seeded with row_seed(5, k), whatever else runs with it
    import gpt2lab
    from gpt2lab.generation.engine import row_seed

    gen = gpt2lab.load(tiny_checkpoint)
    alone = gen.generate(PROMPTS[3], seed=row_seed(5, 3), n=2, max_new_tokens=6, temperature=0.8, top_k=50)
    assert [c.token_ids for c in alone] == [r["token_ids"] for r in records[6:8]]


def _labelled(tmp_path: Path) -> Path:
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"\"{t}\",{label}\n" for t, label in [
        ("the food was great and warm", "pos"), ("a lovely evening with friends", "pos"),
        ("service was slow and rude", "neg"), ("cold soup and a long wait", "neg"),
        ("we will come back soon", "pos"), ("never again at this place", "neg")]), encoding="utf-8")
    return data


def test_augment_with_ray_writes_the_one_process_file(cluster, tiny_checkpoint, tmp_path):
    data = _labelled(tmp_path)
    common = ["augment", str(data), "--label-column", "label", "--model", str(tiny_checkpoint), "--seed", "3",
              "--max-new-tokens", "8", "--min-words", "1", "--json"]
    one = json.loads(_gpt2lab(*common, "--out", str(tmp_path / "one.csv")).stdout)
    on_ray = json.loads(_gpt2lab(*common, "--out", str(tmp_path / "ray.csv"), "--ray", cluster, "--actors", "2")
                        .stdout)
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert on_ray["generated"] == one["generated"] and one["attempts"] == 12
    assert on_ray["rows_out"] == one["rows_out"] > 6


def test_an_interrupted_augment_resumed_on_ray_equals_an_uninterrupted_run(cluster, tiny_checkpoint, tmp_path):
    import gpt2lab
    from gpt2lab.apps.augment import Augmenter, read_dataset
    from gpt2lab.ray.data import augment_rows

    data, gen = _labelled(tmp_path), gpt2lab.load(tiny_checkpoint)

    def job(out: Path) -> Augmenter:
        return Augmenter(gen, read_dataset(data, "text", "label"), out, text_column="text", label_column="label",
                         params=gen.sampling_params(seed=3, max_new_tokens=8, temperature=0.9, top_k=50),
                         min_words=1)

    job(tmp_path / "one.csv").run()
    first = job(tmp_path / "ray.csv")

    def interrupted(start: int):  # this process generates; the run stops after 3 rows
        for i, item in enumerate(first._generate_here(start)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        first.run(generated=interrupted)
    resumed, starts = job(tmp_path / "ray.csv"), []

    def on_ray(start: int):
        starts.append(start)
        return augment_rows(str(tiny_checkpoint), start, 6, {"data": str(data), "text_column": "text",
                                                             "label_column": "label", "params": resumed.params},
                            actors=2, batch_size=2)

    summary = resumed.run(generated=on_ray)
    assert starts == [3] and summary.rows_resumed == 3
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()


def test_perplexity_with_ray_equals_one_process(cluster, tiny_checkpoint, tmp_path):
    import gpt2lab
    from gpt2lab.evaluation import perplexity

    words = "the quick brown fox jumps over the lazy dog while a cat watches from the old wall".split()
    files = []
    for i, n in enumerate((300, 17, 90, 41, 260)):  # long (several windows) and short documents
        path = tmp_path / f"doc{i}.txt"
        path.write_text(" ".join(words[(i + k * 7) % len(words)] for k in range(n)), encoding="utf-8")
        files.append(path)
    r = _gpt2lab("eval", "perplexity", *map(str, files), "--model", str(tiny_checkpoint), "--json",
                 "--block-size", "64", "--ray", cluster, "--actors", "2")
    on_ray = json.loads(r.stdout)
    one = perplexity(files=files, model=gpt2lab.load(tiny_checkpoint), block_size=64)
    assert on_ray["tokens"] == one.tokens and on_ray["bytes"] == one.bytes
    assert on_ray["nll"] == pytest.approx(one.nll, rel=1e-9, abs=0)
    assert on_ray["perplexity"] == pytest.approx(one.perplexity, rel=1e-9, abs=0)
    assert on_ray["bits_per_byte"] == pytest.approx(one.bits_per_byte, rel=1e-9, abs=0)
    assert [d["nll"] for d in on_ray["files"]] == pytest.approx([d.nll for d in one.files], rel=1e-9, abs=0)


def _actor_pids(name: str) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::") and name in cmdline:
            pids.append(proc.info["pid"])
    return pids


def test_a_killed_actor_loses_and_duplicates_no_row(cluster, tiny_checkpoint):
    import gpt2lab
    from gpt2lab.generation.batch import generate_rows
    from gpt2lab.ray.data import generation_rows

    gen = gpt2lab.load(tiny_checkpoint)
    params = gen.sampling_params(seed=11, max_new_tokens=12, n=2)
    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]  # 16 rows, one a call: the kill lands mid-job
    killed: list[int] = []

    def kill_one_actor(done: int) -> None:  # SIGKILL an actor once the first rows are back: mid-job
        if not killed:
            pids = _actor_pids("GenerationPredictor")
            assert pids, "no actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(done)

    rows = list(generation_rows(str(tiny_checkpoint), prompts, params, actors=2, batch_size=1,
                                progress=kill_one_actor))
    assert killed and killed[0] < len(prompts)
    expected = generate_rows(gen, prompts, list(range(len(prompts))), params)
    assert [[(r["prompt"], int(r["index"])) for r in row] for row in rows] == \
        [[(p, i) for i in range(2)] for p in prompts]
    assert [[list(r["token_ids"]) for r in row] for row in rows] == [[c.token_ids for c in row] for row in expected]


def test_serve_replicas_answer_the_openai_client_and_a_killed_one_is_replaced(cluster, tiny_checkpoint):
    import httpx
    import openai
    from ray import serve

    from gpt2lab.ray import deployment

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(deployment(str(tiny_checkpoint), num_replicas=2, num_cpus=0.5, max_batch=1, max_queue=1),
                  name="gpt2lab", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120  # /health answers 503 ("loading") until a replica's model is loaded
        while (codes := {httpx.get(f"{url}/health", timeout=30).status_code for _ in range(6)}) != {200}:
            assert codes <= {200, 503} and time.monotonic() < deadline, codes  # 6 probes: both replicas, likely
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens == 5
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        pieces = [c.choices[0].text for c in client.completions.create(model=model, prompt="Hello", max_tokens=5,
                                                                         temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == out.choices[0].text
        assert "gpt2lab" in httpx.get(f"{url}/metrics", timeout=30).text

        # back-pressure per replica: 1 running + 1 waiting each; the rest of a burst gets the replicas' 429
        from concurrent.futures import ThreadPoolExecutor

        body = {"model": model, "prompt": "Hello", "max_tokens": 100, "ignore_eos": True}
        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code,
                                  range(10)))
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes

        replicas = _actor_pids("ServeReplica:gpt2lab")
        assert len(replicas) == 2, replicas
        os.kill(replicas[0], signal.SIGKILL)  # idle: Ray notices and starts another
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            alive = _actor_pids("ServeReplica:gpt2lab")
            if len(alive) == 2 and replicas[0] not in alive:
                break
            time.sleep(1)
        else:
            pytest.fail("the killed replica was not replaced")
        for _ in range(4):  # every request succeeds, whichever replica gets it
            again = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
            assert again.choices[0].text == out.choices[0].text
    finally:
        serve.shutdown()


def test_a_bare_ray_flag_means_a_local_cluster():
    from gpt2lab.cli.distributed import optional_value

    assert optional_value(["gpt2lab", "generate", "-f", "x", "--ray"]) == \
        ["gpt2lab", "generate", "-f", "x", "--ray", "local"]
    assert optional_value(["gpt2lab", "eval", "perplexity", "a.txt", "--ray", "--actors", "2"]) == \
        ["gpt2lab", "eval", "perplexity", "a.txt", "--ray", "local", "--actors", "2"]
    assert optional_value(["gpt2lab", "generate", "--ray", "auto"]) == ["gpt2lab", "generate", "--ray", "auto"]
    assert optional_value(["gpt2lab", "generate", "--", "--ray"]) == ["gpt2lab", "generate", "--", "--ray"]


def test_deployment_checks_its_arguments_and_passes_autoscaling_through():
    from gpt2lab.ray import deployment

    with pytest.raises(ValueError, match="num_replicas must be an integer >= 1"):
        deployment("m", num_replicas=0)
    with pytest.raises(ValueError, match="autoscaling: unknown field.*max_replica"):
        deployment("m", autoscaling={"max_replica": 4})
    app = deployment("m", autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8},
                     max_batch=4, max_queue=2)
    config = app._bound_deployment._deployment_config
    assert config.autoscaling_config.max_replicas == 3 and config.autoscaling_config.target_ongoing_requests == 8
    assert config.max_ongoing_requests == 4 + 2 + 16  # the replica, not the proxy, answers 429


def test_ray_options_check_their_combinations_in_one_line():
    """--actors needs --ray; serve takes --replicas N or autoscaling, not both (cli.distributed's option
    groups, built with cli.options.command_options): exit 2 and the one line, before any model loads."""
    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    for args, message in ((["generate", "Hi", "--model", "no-such-model", "--actors", "2"], "--actors needs --ray"),
                          (["serve", "--model", "no-such-model", "--port", "0", "--replicas", "2",
                            "--min-replicas", "1"], "give --replicas N, or autoscaling")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and f"gpt2lab: error: {message}" in result.output, result.output
