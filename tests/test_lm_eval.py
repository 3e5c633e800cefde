"""lm-evaluation-harness's ``local-completions`` model against ``gpt2lab serve``: a tiny loglikelihood task
written here (tests/data/lm_eval), run offline, gives the numbers of gpt2lab's own scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
yaml = pytest.importorskip("yaml")
pytest.importorskip("fastapi")

from .server_helpers import get, start_all  # noqa: E402

pytestmark = pytest.mark.slow
TASK_DIR = Path(__file__).parent / "data" / "lm_eval"


def test_lm_eval_local_completions_equals_gpt2lab_scoring(tmp_path_factory, tiny_checkpoint):
    from gpt2lab.generation import load
    from gpt2lab.model import optimize_for_inference

    start_all(tmp_path_factory, tiny_checkpoint)
    server = get("main")
    config = yaml.safe_load((TASK_DIR / "tiny_loglikelihood.yaml").read_text())
    data = TASK_DIR.parents[2] / config["dataset_kwargs"]["data_files"]["test"]  # relative to the repository
    config["dataset_kwargs"]["data_files"]["test"] = str(data)

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": str(tiny_checkpoint), "base_url": f"{server.url}/v1/completions",
                    "tokenizer": str(tiny_checkpoint), "tokenizer_backend": "huggingface", "max_retries": 1,
                    "max_length": 128},
        tasks=[config], log_samples=True, bootstrap_iters=0,
        # only this task: indexing lm-eval's thousands of built-in task files takes minutes on a busy machine
        task_manager=lm_eval.tasks.TaskManager(include_defaults=False))

    gen = load(str(tiny_checkpoint))
    optimize_for_inference(gen.model)  # as the server does
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    samples = sorted(results["samples"][config["task"]], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    expected = []
    for doc, sample in zip(docs, samples):
        # lm-eval's split: context tokens, then the rest of the joint encoding
        context = gen.tokenizer.encode(doc["context"])
        whole = gen.tokenizer.encode(doc["context"] + doc["continuation"])
        scored = gen.score(whole)[len(context) - 1:]
        ll = sum(e.logprob for e in scored)
        greedy = all(e.rank == 1 for e in scored)
        got_ll, got_greedy = sample["resps"][0][0]
        assert got_ll == pytest.approx(ll, abs=1e-3), doc
        assert bool(got_greedy) == greedy
        expected.append(ll)
    metrics = results["results"][config["task"]]
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(expected) / len(expected)), rel=1e-4)
